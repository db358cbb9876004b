"""``memprop backprop``: forward and backward propagation of the notes' network,
step by step, with what is stored, the gradients by formula next to autograd's, and
the tensors autograd itself saves."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from memprop.cli._common import DTYPE_NAMES, add_command, parse_dtype, positive_int, render_table
from memprop.units import format_bytes

if TYPE_CHECKING:                      # imported when gathering: the CLI starts without them
    import pandas as pd
    import torch

    from memprop.models import D2LConfig

_FORWARD_STEPS = [("x", "input", "(B, d)"), ("z", "X W1ᵀ", "(B, h)"),
                  ("h", "φ(z)", "(B, h)"), ("o", "H W2ᵀ", "(B, q)")]
_BACKWARD_STEPS = [
    ("dJ_do", "∂J/∂o = ∂L/∂o = (softmax(o) − onehot(y)) / B", "o"),
    ("dJ_dW2", "∂J/∂W2 = (∂J/∂o)ᵀ h + λ W2", "h"),
    ("dJ_dh", "∂J/∂h = (∂J/∂o) W2", "W2"),
    ("dJ_dz", "∂J/∂z = ∂J/∂h ⊙ φ′(z)", "z"),
    ("dJ_dW1", "∂J/∂W1 = (∂J/∂z)ᵀ x + λ W1", "x"),
]


@dataclasses.dataclass
class BackpropWalkthrough:
    """Everything ``memprop backprop`` shows, as data."""

    config: "D2LConfig"
    batch: int
    dtype: "torch.dtype"
    forward: "pd.DataFrame"        # step, variable, formula, shape, stored_bytes
    stored_bytes: int            # measured from the cache
    formula_bytes: int           # B·(d + 2h + q)·itemsize
    scalars: dict[str, float]    # L, s, J
    backward: "pd.DataFrame"       # step, gradient, formula, uses, shape, max_abs_diff
    autograd_saved: "pd.DataFrame"  # SavedTensorRecorder.frame() of the same network
    autograd_saved_bytes: int
    autograd_param_bytes: int


def gather_backprop(*, d=784, h=256, q=10, batch=64, phi="relu", lam=1e-3,
                    dtype=None, seed=0) -> BackpropWalkthrough:
    import pandas as pd
    import torch

    from memprop import backprop as bp
    from memprop.models import D2LConfig, training_loss
    from memprop.models.d2l import D2LMLP
    from memprop.saved import SavedTensorRecorder

    dtype = dtype or torch.float32
    cfg = D2LConfig(d=d, h=h, q=q, phi=phi, lam=lam)
    model = cfg.build(dtype=dtype, seed=seed)
    assert isinstance(model, D2LMLP)          # what D2LConfig builds: W1 and W2 below
    (x,), y = cfg.example_batch(batch, dtype=dtype, seed=seed)
    W1, W2 = model.W1.detach(), model.W2.detach()

    cache = bp.forward(x, y, W1, W2, phi=phi, lam=lam)
    itemsize = x.element_size()
    forward = pd.DataFrame([
        dict(step=i + 1, variable=name, formula=formula, shape=str(tuple(cache.stored[name].shape)),
             stored_bytes=cache.stored[name].numel() * itemsize)
        for i, (name, formula, _) in enumerate(_FORWARD_STEPS)])

    hand = bp.backward(cache, y, W1, W2, phi=phi, lam=lam)
    auto = bp.autograd_gradients(x, y, W1, W2, phi=phi, lam=lam)
    backward = pd.DataFrame([
        dict(step=i + 1, gradient=key, formula=formula, uses=uses,
             shape=str(tuple(getattr(hand, key).shape)),
             max_abs_diff=(getattr(hand, key) - auto[key]).abs().max().item())
        for i, (key, formula, uses) in enumerate(_BACKWARD_STEPS)])

    with SavedTensorRecorder(model, inputs=(x, y)) as rec:
        loss = training_loss(model, ((x,), y))
        rec.add_root(loss)
    return BackpropWalkthrough(
        config=cfg, batch=batch, dtype=dtype, forward=forward,
        stored_bytes=cache.stored_bytes, formula_bytes=batch * (d + 2 * h + q) * itemsize,
        scalars={k: getattr(cache, k).item() for k in ("L", "s", "J")},
        backward=backward, autograd_saved=rec.frame(),
        autograd_saved_bytes=rec.saved_bytes, autograd_param_bytes=rec.param_saved_bytes)


def render_backprop(w: BackpropWalkthrough) -> str:
    import torch

    c = w.config
    dtype = str(w.dtype).replace("torch.", "")
    itemsize = torch.empty((), dtype=w.dtype).element_size()
    lines = [
        f"The notes' network: d={c.d}, h={c.h}, q={c.q}, batch B={w.batch}, φ={c.phi}, "
        f"λ={c.lam}, {dtype}",
        "",
        "1. Forward propagation computes and stores, input layer to output layer:",
        render_table(w.forward),
        f"  stored: {format_bytes(w.stored_bytes)} ({w.stored_bytes} bytes) = B·(d + 2h + q)·"
        f"{itemsize} = {w.batch}·({c.d} + {2 * c.h} + {c.q})·{itemsize} = {w.formula_bytes} bytes",
        "  scalars: " + ", ".join(f"{k} = {v:.6g}" for k, v in w.scalars.items())
        + "   (J = L + s)",
        "",
        "2. Backward propagation, output layer to input layer (∂J/∂L = ∂J/∂s = 1),",
        "   each gradient by the notes' formula next to autograd's:",
        render_table(w.backward.assign(max_abs_diff=w.backward.max_abs_diff.map("{:.2e}".format))),
        "   'uses' is the stored value the formula reads: it must stay alive until then.",
        "",
        "3. What autograd itself saves for backward on the same network"
        " (distinct storages, in order):",
        render_table(w.autograd_saved),
        f"  stored intermediates (activations + inputs): {format_bytes(w.autograd_saved_bytes)};"
        f" parameters saved too, counted apart: {format_bytes(w.autograd_param_bytes)}",
        "  autograd keeps h once (φ's output is also W2's saved input) and not z: for relu,",
        "  tanh and sigmoid, φ′ is computed from the output φ(z). Where the notes store o,",
        "  autograd stores log-softmax(o), what the cross-entropy's backward reads.",
    ]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = add_command(sub, "backprop", help="walk through forward and backward propagation of "
                    "the notes' one-hidden-layer network", doc=__doc__)
    p.add_argument("--d", type=positive_int, default=784, help="input size d")
    p.add_argument("--h", type=positive_int, default=256, help="hidden size h")
    p.add_argument("--q", type=positive_int, default=10, help="output size q")
    p.add_argument("--batch", type=positive_int, default=64, help="minibatch size B")
    p.add_argument("--phi", default="relu", help="activation φ: relu, tanh, sigmoid")
    p.add_argument("--lam", type=float, default=1e-3, help="L2 weight λ")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="dtype of weights and inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.set_defaults(func=backprop_command)


def backprop_command(args) -> int:
    walk = gather_backprop(d=args.d, h=args.h, q=args.q, batch=args.batch, phi=args.phi,
                           lam=args.lam, dtype=parse_dtype(args.dtype), seed=args.seed)
    print(render_backprop(walk))
    return 0
