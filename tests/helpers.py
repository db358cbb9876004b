"""Helpers the test modules share: applying a strategy quietly, one seeded step, the
small models and cost chains several modules test on, writing sweep specs, and a
sharded run against its prediction. Test modules import from here, never from one
another."""

import random
import textwrap
import warnings

import torch
from torch import nn

import memprop
from memprop.checkpoint import apply_strategy
from memprop.checkpoint.planning.dp import ChainCosts


def quiet_apply(model, strategy, **kwargs):
    """``apply_strategy`` without the KV-cache and CPU-offload notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply_strategy(model, strategy, **kwargs)


def loss_and_grads(loss_fn, model, batch, *, seed: int = 0, params=None):
    """Loss and a copy of each parameter's gradient (None where it got none) after one
    forward + backward from zeroed gradients, dropout seeded with ``seed``. ``params``:
    the module whose parameters to read (default ``model``; a wrapper's inner model)."""
    owner = params if params is not None else model
    owner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone()
                           for n, p in owner.named_parameters()}


def cfg_loss_and_grads(cfg, model, data, *, seed: int = 0):
    """``cfg.loss``'s loss and a copy of every parameter's gradient, as a list in
    ``model.parameters()`` order, after one forward + backward from zeroed gradients with
    dropout seeded by ``seed``. Every parameter must get a gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = cfg.loss(model, data)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same_step(a, b, what=""):
    """Two ``loss_and_grads`` results are bitwise equal (None gradients alike)."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b), f"{what}: loss {loss_a} != {loss_b}"
    assert grads_a.keys() == grads_b.keys(), what
    for name, g in grads_a.items():
        h = grads_b[name]
        assert (g is None) == (h is None), f"{what}: {name} has a gradient in one run only"
        assert g is None or torch.equal(g, h), f"{what}: {name} differs"


def random_chain(rng: random.Random) -> ChainCosts:
    """A random chain of 1 to 7 blocks for the planners' DPs (checked against brute
    force)."""
    n = rng.randint(1, 7)
    return ChainCosts(
        t=tuple(rng.randint(1, 50) for _ in range(n + 1)),
        inner=tuple(rng.randint(0, 60) for _ in range(n)),
        saves_in=tuple(rng.random() < 0.5 for _ in range(n)),
        saves_out=tuple(rng.random() < 0.5 for _ in range(n)),
        keep=tuple(rng.random() < 0.3 for _ in range(n + 1)),
        flops=tuple(rng.randint(1, 20) for _ in range(n)),
        const=rng.randint(0, 30),
        grad=tuple(rng.randint(0, 20) for _ in range(n)), grad_post=rng.randint(0, 10))


class InPlaceChain(nn.Module):
    """Blocks of Linear + ReLU(inplace=True): each matmul output is changed in place."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True))
                                    for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def square_loss(model, batch):
    return model(batch).square().sum()


class ParallelBlock(nn.Module):
    """Falcon's parallel block in miniature: the MLP's output, a view of its matmul's
    output (a 3-d input: mm, then _unsafe_view), written into in place."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        a = self.attn(h)
        m = self.down(torch.relu(self.up(h)))
        m += a                                   # into a view of down's mm output
        return m + x


class ParallelChain(nn.Module):
    """``depth`` parallel blocks and a linear head."""

    def __init__(self, d=16, depth=3):
        super().__init__()
        self.blocks = nn.Sequential(*(ParallelBlock(d) for _ in range(depth)))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.blocks(x))


def write_spec(tmp_path, text, name="spec.toml"):
    """``text`` dedented into ``tmp_path / name``; the path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# an MLP whose step needs ~0.5 MiB at batch 8 and ~67 MiB at batch 4096, under 16 MiB
BUDGETED_SPEC = """
name = "budgeted"
[model]
name = "mlp"
width = 512
d_in = 512
[grid]
depth = [4]
batch = [8, 4096]
[run]
repeats = 1
budget = "16MiB"
timeout = 60
"""

# an MLP frontier with a real fit and a real out-of-memory one step (512) above it
FRONTIER_SPEC = """
        name = "front"
        [model]
        name = "mlp"
        width = 128
        d_in = 128
        [grid]
        batch = [8]
        [frontier]
        budget = "12MiB"
        depths = [4]
        strategies = ["none"]
        batch_step = 512
        max_batch = 65536
"""


def timeline_rows(timeline):
    """The timeline's rows that allocate or free: fake tensors answer ``.device`` with a
    ``prim.device`` op that real tensors answer without the dispatcher (no storage)."""
    rows = timeline[~timeline.op.str.startswith("prim.")]
    return rows[["phase", "module", "op", *[f"{c}_bytes" for c in memprop.CATEGORIES],
                 "total_bytes"]].reset_index(drop=True)


def assert_ranks_equal(real, fake, same_rows=None):
    """Every rank of a real sharded run (memprop.sharded) and of its prediction: the
    same peak, by phase and category, stored and gathered bytes, live bytes before the
    step, and timeline rows (``same_rows(real_rows, fake_rows, rank)`` asserts them;
    default: equal)."""
    assert not real.predicted and fake.predicted
    assert real.rank_peak_bytes == fake.rank_peak_bytes
    assert real.peak_bytes == fake.peak_bytes == max(real.rank_peak_bytes)
    assert real.rank_saved_bytes == fake.rank_saved_bytes
    for r in range(real.world_size):
        m, p = real.rank(r), fake.rank(r)
        assert m.peak_by_phase == p.peak_by_phase, r
        assert m.peak_by_category == p.peak_by_category, r
        assert (m.start_bytes, m.saved_bytes, m.saved_count) == \
            (p.start_bytes, p.saved_bytes, p.saved_count), r
        for key in ("gathered_bytes_at_peak", "gathered_peak_bytes"):
            assert m.meta[key] == p.meta[key], (r, key)
        if same_rows is None:
            assert timeline_rows(m.timeline).equals(timeline_rows(p.timeline)), r
        else:
            same_rows(timeline_rows(m.timeline), timeline_rows(p.timeline), r)


# sharded trials (a spec's [parallel]): an MLP whose 4 parameter tensors of 64 rows split
# evenly over 1, 2 and 4 ranks and whose 10-row head does not, predicted on fake ranks
SHARDED_MLP = dict(depth=2, width=64, d_in=96, d_out=10)
SHARDED_SPEC = """
name = "sharded_small"
[model]
name = "mlp"
depth = 2
width = 64
d_in = 96
d_out = 10
[grid]
batch = [8]
[run]
optimizer = "adam"
timeout = 120
[parallel]
world_size = [1, 2, 4]
estimate = true
"""


# rank functions for memprop.sharded.spawn.run_on_ranks (the ranks import them by name:
# a test puts tests/ on PYTHONPATH)
def rank_fails_on_rank_1(job, mesh):
    """Rank 1 raises; rank 0 waits in a barrier for a peer that never comes."""
    import torch.distributed as dist
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()
    return "unreachable"


def rank_writes_pid_and_waits(job, mesh):
    """Writes this rank's pid to $MEMPROP_TEST_PIDS/<rank>, then waits (a killed parent)."""
    import os
    import time

    import torch.distributed as dist
    path = os.path.join(os.environ["MEMPROP_TEST_PIDS"], str(dist.get_rank()))
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(600)
