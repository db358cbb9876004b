"""Your own module in three lines (issue 24, item 1) and inference on the plain model
(item 3): ``measure_step`` / ``estimate`` / ``plan`` on any ``nn.Module`` and batch,
estimate = measurement to the byte, and inference peaks that do not depend on the
training strategy."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_step, loss_and_grads, quiet_apply
from torch import nn

import memprop
from memprop.checkpoint import applied_strategy, parse_strategy, plan
from memprop.errors import ConfigError
from memprop.estimate import estimate
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.models.user import Criterion, own_loss
from memprop.workload import build_workload

README = Path(__file__).resolve().parent.parent / "README.md"


class TinyCNN(nn.Module):
    """The issue's model: conv, BatchNorm, dropout, a linear head; no objective."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):                                   # (B, 3, 8, 8) -> (B, 10)
        return self.head(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


class DictNet(nn.Module):
    """Keyword inputs: features (B, 12) and a mask (B, 1)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 3)

    def forward(self, features, mask):
        return self.fc2(torch.tanh(self.fc1(features))) * mask


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class OwnLoss(nn.Module):
    """transformers' convention: given labels, the output carries its ``.loss``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, features, labels=None):
        logits = self.fc(features)
        return Output(logits, None if labels is None else F.cross_entropy(logits, labels))


class WithObjective(nn.Module):
    """The zoo's convention: an ``objective(output, targets)`` method."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(x)

    def objective(self, output, targets):
        return (output - targets).pow(2).mean()


def mlp(d=20, h=32, q=4):
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, q))


def cnn_batch(b=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


FIELDS = ("saved_bytes", "saved_count", "param_saved_bytes", "peak_bytes", "start_bytes",
          "first_step_peak_bytes", "budget_peak_bytes", "inference_peak_bytes",
          "inference_saved_bytes", "forward_flops", "backward_flops", "peak_by_phase",
          "peak_by_category")


def assert_estimate_equals_measurement(model, batch, **kw):
    """``estimate(model, batch)`` = ``measure_step(model, batch)`` on every byte count;
    the module is left bitwise as it was. Returns the measurement."""
    before = copy.deepcopy(model.state_dict())
    fake = estimate(model, batch, **kw)
    real = measure_step(model, batch, repeats=1, **kw)
    assert fake.predicted and not real.predicted
    for name in FIELDS:
        assert getattr(fake, name) == getattr(real, name), name
    assert fake.saved_bytes > 0 and fake.peak_bytes > fake.inference_peak_bytes > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return real


def test_cnn_with_batchnorm_and_dropout_estimate_equals_measurement():
    torch.manual_seed(0)
    model = TinyCNN()
    m = assert_estimate_equals_measurement(model, cnn_batch(), loss_fn=F.cross_entropy)
    # the loss is cross-entropy: its log-softmax output (16 x 10 floats) is stored
    assert (m.saved.op == "LogSoftmaxBackward0").sum() == 1
    assert m.saved.query("op == 'LogSoftmaxBackward0'").saved_bytes.iloc[0] == 16 * 10 * 4
    # a loss module is the same criterion as its function
    assert measure_step(model, cnn_batch(), loss_fn=nn.CrossEntropyLoss(), repeats=1,
                        timing=False).saved_bytes == m.saved_bytes


def test_mlp_on_a_bare_tensor_takes_the_synthetic_objective_bytes_by_hand():
    torch.manual_seed(0)
    B, d, h, q = 16, 20, 32, 4
    model, x = mlp(d, h, q), torch.randn(B, d)
    m = assert_estimate_equals_measurement(model, x)
    # Linear 1 saves x (input); ReLU saves its output, which Linear 2 saves too (one
    # storage); pow(2) of the synthetic objective saves the output (B, q); mean saves none
    assert m.saved_bytes == B * d * 4 + B * h * 4 + B * q * 4
    # Linear 2 saves its weight (its input needs grad); Linear 1's input is data
    assert m.param_saved_bytes == h * q * 4
    # the synthetic objective is the mean square of the output
    with torch.no_grad():
        assert torch.equal(own_loss(model, x), model(x).pow(2).mean())


def test_model_taking_a_dict_estimate_equals_measurement():
    torch.manual_seed(0)
    batch = {"features": torch.randn(8, 12), "mask": torch.ones(8, 1)}
    m = assert_estimate_equals_measurement(DictNet(), batch)
    # fc1 saves features (input), tanh its output (= fc2's input), mul the mask (an
    # input: the other factor needs a gradient, the mask none); pow saves mul's output
    assert m.saved_bytes == 8 * 12 * 4 + 8 * 24 * 4 + 8 * 1 * 4 + 8 * 3 * 4
    # a dict as the inputs of (inputs, targets), with a criterion: l1 (|out - y|.mean())
    # has abs save the difference (8, 3), where pow saved mul's output: the same bytes
    y = torch.randn(8, 3)
    m = assert_estimate_equals_measurement(DictNet(), (batch, y), loss_fn=F.l1_loss)
    assert m.saved_bytes == 8 * 12 * 4 + 8 * 24 * 4 + 8 * 1 * 4 + 8 * 3 * 4


def test_output_loss_and_objective_are_the_default_loss():
    torch.manual_seed(0)
    x, labels = torch.randn(8, 12), torch.randint(0, 5, (8,))
    model = OwnLoss()
    m = assert_estimate_equals_measurement(model, {"features": x, "labels": labels})
    with torch.no_grad():
        assert torch.equal(own_loss(model, {"features": x, "labels": labels}),
                           F.cross_entropy(model.fc(x), labels))
    # its log-softmax is stored; inference drops the labels (no loss, nothing stored)
    assert (m.saved.op == "LogSoftmaxBackward0").sum() == 1 and m.inference_saved_bytes == 0
    y = torch.randn(8, 5)
    m = assert_estimate_equals_measurement(WithObjective(), (x, y))
    # Linear saves x (input); pow saves the difference (8, 5)
    assert m.saved_bytes == 8 * 12 * 4 + 8 * 5 * 4


@pytest.mark.parametrize("loss, loss_storage_bytes", [
    (F.mse_loss, 16 * 5 * 4), (F.smooth_l1_loss, 16 * 5 * 4),
    (F.soft_margin_loss, 16 * 5 * 4), (F.huber_loss, 4), (F.l1_loss, 4),
    (lambda o, t: F.mse_loss(o, t, reduction="sum"), 16 * 5 * 4),
    (lambda o, t: F.smooth_l1_loss(o, t, beta=0.0), 4),
    (lambda o, t: F.binary_cross_entropy(torch.sigmoid(o), t.sigmoid()), 16 * 5 * 4)])
def test_criteria_whose_cpu_loss_keeps_its_elementwise_buffer_are_estimated_exactly(
        loss, loss_storage_bytes):
    """NOTE [ CPU losses keep their elementwise buffer ] (memprop.fake): the 0-dim loss
    of these kernels holds a (16, 5) float32 storage, and the estimate says so."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 12), torch.randn(16, 5)
    with torch.no_grad():
        assert loss(torch.randn(16, 5), y).untyped_storage().nbytes() == loss_storage_bytes
    assert_estimate_equals_measurement(nn.Linear(12, 5), (x, y), loss_fn=Criterion(loss))


def test_each_missing_loss_is_one_line_naming_loss_fn():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), cnn_batch(32)
    fix = ("pass loss_fn=, e.g. loss_fn=F.cross_entropy (called as loss_fn(output, targets)) "
           "or loss_fn=fn(model, batch) returning the scalar to differentiate")
    cases = [
        (lambda: measure_step(model, (x, y)),
         "memprop.measure: TinyCNN has no objective(output, targets) method and its output "
         "(a float32 tensor of shape (32, 10)) has no .loss, so nothing says how to compare "
         "it with the batch's targets (an int64 tensor of shape (32,)); " + fix),
        (lambda: estimate(model, (x, y)),
         "memprop.measure: TinyCNN has no objective(output, targets) method and its output "
         "(a float32 tensor of shape (32, 10)) has no .loss, so nothing says how to compare "
         "it with the batch's targets (an int64 tensor of shape (32,)); " + fix),
        (lambda: estimate(model, 32),
         "memprop.estimate: a module is estimated on an example batch, not a batch size "
         "(32); pass the batch: a tensor, (inputs, targets) or a dict of keyword inputs, "
         "e.g. estimate(model, (x, y), loss_fn=F.cross_entropy) (only its shapes are read)"),
        (lambda: estimate(model, (x, y), loss_fn=F.cross_entropy, dtype=torch.bfloat16),
         "memprop.estimate: dtype= builds a model config; a module (TinyCNN) is estimated "
         "as it is, in its own dtype and on its own device: convert the module and the "
         "batch first"),
        (lambda: measure_step(model, (x, y, y)),
         "memprop.measure: a batch is a tensor (the input), (inputs, targets), or a dict of "
         "keyword inputs; got a tuple of 3 items; for any other structure pass "
         "loss_fn=fn(model, batch) and forward_fn=fn(model, batch)"),
        (lambda: measure_step(nn.LSTM(4, 4), torch.randn(3, 2, 4)),
         "memprop.measure: LSTM's output is a tuple of 2 items, not a tensor, and has no "
         ".loss, so a step has no loss to take; " + fix),
        (lambda: measure_step(model, x, loss_fn=F.cross_entropy),
         "memprop.measure: loss_fn=cross_entropy compares the output with targets, but the "
         "batch (a float32 tensor of shape (32, 3, 8, 8)) has none; pass (inputs, targets), "
         "or leave loss_fn out for the output's own .loss or the synthetic objective"),
        (lambda: estimate(42, 8, loss_fn=F.cross_entropy),
         "memprop.estimate: the first argument is int with loss_fn=; estimate a model "
         "config at a batch size (estimate(model_config('mlp'), 64), whose config brings "
         "its own loss) or any nn.Module on an example batch (estimate(model, (x, y), "
         "loss_fn=F.cross_entropy))"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as exc:
            call()
        assert str(exc.value) == message
        assert "\n" not in message
    # the failed attempts left the module as it was: training mode, no gradients
    assert model.training and all(p.grad is None for p in model.parameters())


def test_readme_snippet_runs_as_written_and_shows_true_bytes():
    text = README.read_text()
    section = text[text.index("## Your own model"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "measure_step(model, (x, y), loss_fn=F.cross_entropy)" in snippet
    scope = {}
    torch.manual_seed(0)
    exec(compile(snippet, str(README), "exec"), scope)
    m, e = scope["m"], scope["e"]
    shown = re.search(r"# \((\d+), (\d+), (\d+)\)", snippet).groups()
    assert (m.saved_bytes, m.peak_bytes, m.inference_peak_bytes) == tuple(map(int, shown))
    assert (e.saved_bytes, e.peak_bytes, e.inference_peak_bytes) == tuple(map(int, shown))
    # the one-line error the README quotes, for the snippet's model without loss_fn=
    quoted = re.search(r"one line says so:\s*`(memprop\.measure: .*?)\.\.\.`", section, re.S)
    with pytest.raises(ConfigError) as exc:
        measure_step(scope["model"], (scope["x"], scope["y"]))
    assert str(exc.value).startswith(" ".join(quoted.group(1).split()))
    # the planner on the same module and batch: what the README's second block says
    model, x, y = scope["model"], scope["x"], scope["y"]
    p = memprop.plan(model, (x, y), "10MiB", loss_fn=F.cross_entropy)
    assert p.predicted_peak_bytes <= 10 * 2**20 and p.objective == "time"
    assert "p.predicted_peak_bytes <= 10 * 2**20    # -> True" in section
    assert p.spec in [spec for spec, _, _ in p.weighed]
    p.apply(model)
    after = measure_step(model, (x, y), loss_fn=F.cross_entropy, strategy=str(p.strategy),
                         repeats=1)
    assert after.peak_bytes == p.predicted_peak_bytes            # measured to the byte
    assert after.inference_peak_bytes == m.inference_peak_bytes == 5245232


def test_plan_takes_a_criterion_on_any_module_and_its_peak_is_measured():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(6)],
                          nn.Linear(64, 10))
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    plain = measure_step(model, (x, y), loss_fn=F.cross_entropy, repeats=1)
    p = plan(model, (x, y), int(plain.peak_bytes * 0.9), loss_fn=Criterion(F.cross_entropy))
    assert p.predicted_peak_bytes <= plain.peak_bytes * 0.9
    p.apply(model)
    m = measure_step(model, (x, y), loss_fn=F.cross_entropy, strategy=str(p.strategy),
                     repeats=1)
    assert m.peak_bytes == p.predicted_peak_bytes
    assert m.inference_peak_bytes == plain.inference_peak_bytes


@pytest.mark.parametrize("how", ["torch loss", "bare tensor"])
def test_plan_reads_batch_and_loss_as_measure_step_does(how):
    # plan(model, batch) takes what measure_step takes: a torch loss as loss_fn, or a
    # bare tensor with the default (synthetic) objective; its plan's peak is measured
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(6)],
                          nn.Linear(64, 10))
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    batch, kw = ((x, y), dict(loss_fn=F.cross_entropy)) if how == "torch loss" else (x, {})
    plain = measure_step(model, batch, repeats=1, **kw)
    p = plan(model, batch, int(plain.peak_bytes * 0.9), **kw)
    assert p.predicted_peak_bytes <= plain.peak_bytes * 0.9 and p.spec != "none"
    p.apply(model)
    assert measure_step(model, batch, repeats=1, **kw).peak_bytes == p.predicted_peak_bytes


def test_estimate_of_a_module_allocates_nothing_of_its_step():
    import psutil
    torch.manual_seed(0)
    B, w, depth = 16384, 1024, 48
    model = nn.Sequential(*[nn.Sequential(nn.Linear(w, w), nn.ReLU()) for _ in range(depth)])
    x = torch.randn(B, w)                                       # 64 MiB, real
    rss = psutil.Process().memory_info().rss
    e = estimate(model, x, flops=False)
    assert psutil.Process().memory_info().rss - rss < 256 * 2**20
    # x, then each ReLU output (= the next Linear's input, one storage), then the
    # synthetic objective's pow saving the last ReLU's output: one more reference to it
    assert e.saved_bytes == B * w * 4 + depth * B * w * 4
    assert e.peak_bytes > 3 * 2**30 and all(p.grad is None for p in model.parameters())


def test_estimate_predicts_the_strategy_the_module_runs_or_is_given():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(9)])
    x = torch.randn(64, 32)
    plain = estimate(model, x)
    given = estimate(model, x, strategy="sqrt")
    assert applied_strategy(model) is None          # the twin ran it, not the module
    quiet_apply(model, "sqrt")
    running = assert_estimate_equals_measurement(model, x)
    assert estimate(model, x).strategy == given.strategy == "sqrt" and plain.strategy == "none"
    assert given.saved_bytes == running.saved_bytes < plain.saved_bytes
    assert given.inference_peak_bytes == plain.inference_peak_bytes
    with pytest.raises(ConfigError, match="already runs strategy sqrt"):
        estimate(model, x, strategy="full")


# -- item 3: inference is inference ---------------------------------------------------

STRATEGIES = ("none", "sqrt", "full")


def _applied_state(model):
    """What a strategy left on the model: its record, each patch and where it sits, and
    every config's use_cache."""
    record = model.__dict__.get("_memprop_applied")
    patches = [(p, p.module, p.previous) for p in record.patches] if record else []
    caches = [(m.config, m.config.use_cache) for m in model.modules()
              if getattr(getattr(m, "config", None), "use_cache", None) is not None]
    return record, patches, caches


def _inference_peaks_and_bitwise(config, batch_size):
    """Inference peak under each strategy, measured and estimated; after measuring the
    model still runs its strategy, exactly, and trains bitwise as a copy made before."""
    peaks = {}
    for name in STRATEGIES:
        model, batch = build_workload(config, batch_size)
        quiet_apply(model, name, example_batch=batch, loss_fn=config.loss)
        before = copy.deepcopy(model)                 # carries the strategy
        record, patches, caches = _applied_state(model)
        m = measure_step(model, batch, loss_fn=config.loss, forward_fn=config.forward,
                         strategy=name, repeats=1, timing=False, flops=False)
        assert _applied_state(model)[0] is record
        for patch, module, previous in patches:
            assert module.__dict__["forward"] is patch and patch.previous is previous
        assert [(c, c.use_cache) for c, _ in caches] == caches
        assert_same_step(loss_and_grads(config.loss, model, batch),
                         loss_and_grads(config.loss, before, batch), name)
        e = estimate(config, batch_size, strategy=name, flops=False)
        peaks[name] = (m.inference_peak_bytes, e.inference_peak_bytes)
    return peaks


def test_inference_peak_of_the_mlp_does_not_depend_on_the_strategy():
    cfg = model_config("mlp", depth=8, width=128)
    peaks = _inference_peaks_and_bitwise(cfg, 256)
    # measured = estimated, and one value for every strategy (sqrt gave 1911848 before)
    assert set(peaks.values()) == {(1649704, 1649704)}


def test_inference_peak_of_gpt2_keeps_its_kv_cache_under_every_strategy():
    cfg = model_config("hf:gpt2", n_layer=4, n_embd=32, n_head=4, seq_len=32)
    assert cfg.build().config.use_cache is True
    peaks = _inference_peaks_and_bitwise(cfg, 4)
    assert len(set(peaks.values())) == 1, peaks
    measured, estimated = peaks["none"]
    assert measured == estimated
    # the cache is on in the inference pass under sqrt too: with it off, the peak is lower
    model, batch = build_workload(cfg, 4, strategy="none")
    model.config.use_cache = False
    off = measure_step(model, batch, loss_fn=cfg.loss, forward_fn=cfg.forward, repeats=1,
                       timing=False, flops=False).inference_peak_bytes
    assert off < measured


def test_strategy_object_applied_by_measure_step_is_removed_and_inference_plain():
    cfg = model_config("mlp", depth=8, width=64, d_in=32)
    model, batch = build_workload(cfg, 64)
    plain = measure_step(model, batch, repeats=1, timing=False)
    m = measure_step(model, batch, strategy=parse_strategy("sqrt"), repeats=1, timing=False)
    assert applied_strategy(model) is None
    assert m.strategy == "sqrt" and m.saved_bytes < plain.saved_bytes
    assert m.inference_peak_bytes == plain.inference_peak_bytes
