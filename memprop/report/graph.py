"""The notes' computational graph of the one-hidden-layer network, drawn as in the notes:
variables as squares, operators as circles, inputs bottom-left, the objective top-right,
each stored variable annotated with the bytes forward propagation keeps for it.

The bytes are arithmetic on the shapes (nothing is run): x (B, d), z and h (B, h),
o (B, q) in float32, and the targets y (B,) in int64, which autograd keeps as well (the
cross-entropy's backward reads them)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyBboxPatch  # noqa: E402

from memprop.units import format_bytes  # noqa: E402

__all__ = ["d2l_graph_figure", "d2l_sizes"]

# (x, y) positions: the data flows right and up
VARIABLES = {"x": (0.0, 0.0), "W1": (0.0, 1.6), "z": (2.6, 0.8), "h": (5.2, 0.8),
             "W2": (5.2, 2.2), "o": (7.8, 1.5), "y": (7.8, 0.0), "L": (10.4, 1.5),
             "s": (7.8, 3.6), "J": (13.0, 2.6)}
OPERATORS = {"×₁": (1.3, 0.8), "φ": (3.9, 0.8), "×₂": (6.5, 1.5), "l": (9.1, 1.5),
             "‖·‖²": (3.9, 3.6), "+": (11.7, 2.6)}
EDGES = [("x", "×₁"), ("W1", "×₁"), ("×₁", "z"), ("z", "φ"), ("φ", "h"), ("h", "×₂"),
         ("W2", "×₂"), ("×₂", "o"), ("o", "l"), ("y", "l"), ("l", "L"), ("W1", "‖·‖²"),
         ("W2", "‖·‖²"), ("‖·‖²", "s"), ("L", "+"), ("s", "+"), ("+", "J")]
STORED = ("x", "z", "h", "o", "y")     # the notes' cache, and the targets autograd saves


def stored_bytes(B: int, d: int, h: int, q: int, itemsize: int = 4) -> dict[str, int]:
    """Bytes of each stored variable: the notes' cache x, z, h, o (float32) and the
    targets y (int64 class indices)."""
    return {"x": B * d * itemsize, "z": B * h * itemsize, "h": B * h * itemsize,
            "o": B * q * itemsize, "y": B * 8}


def d2l_sizes(data=None) -> dict:
    """Sizes of the drawn network: a d2l_mlp trial's if the store has one, else the
    notes' MNIST-like defaults."""
    if data is not None and not data.ok.empty:
        d2l = data.ok[data.ok.model == "d2l_mlp"]
        if not d2l.empty:
            r = d2l.sort_values("batch").iloc[-1]
            return dict(d=int(r.get("cfg_d", 784)), h=int(r.get("cfg_h", 256)),
                        q=int(r.get("cfg_q", 10)), batch=int(r.batch),
                        phi=str(r.get("cfg_phi", "relu")), saved_bytes=r.get("saved_bytes"))
    return dict(d=784, h=256, q=10, batch=64, phi="relu")


def d2l_graph_figure(data=None):
    sizes = d2l_sizes(data)
    B, d, h, q = sizes["batch"], sizes["d"], sizes["h"], sizes["q"]
    stored = stored_bytes(B, d, h, q)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    pos = {**VARIABLES, **OPERATORS}
    for a, b in EDGES:
        ax.annotate("", xy=pos[b], xytext=pos[a],
                    arrowprops=dict(arrowstyle="-|>", color="#555555", lw=1.2,
                                    shrinkA=22, shrinkB=22))
    for name, (x, y) in VARIABLES.items():
        color = "#CFE8D4" if name in STORED else ("#DCE6F5" if name.startswith("W") else "#F2F2F2")
        ax.add_patch(FancyBboxPatch((x - 0.45, y - 0.35), 0.9, 0.7,
                                    boxstyle="square,pad=0", fc=color, ec="#333333"))
        ax.text(x, y, name, ha="center", va="center", fontsize=12)
        if name in STORED:
            ax.text(x, y - 0.55, f"stored: {format_bytes(stored[name])}", ha="center",
                    va="top", fontsize=8, color="#1B5E20")
    for name, (x, y) in OPERATORS.items():
        ax.add_patch(Circle((x, y), 0.38, fc="white", ec="#333333"))
        ax.text(x, y, name, ha="center", va="center", fontsize=10)
    ax.set_xlim(-1, 14)
    ax.set_ylim(-1.1, 4.4)
    ax.set_aspect("equal")
    ax.axis("off")
    cache = sum(stored[k] for k in ("x", "z", "h", "o"))
    ax.set_title(f"The notes' computational graph (squares: variables, circles: operators). "
                 f"Forward stores x, z, h, o: {format_bytes(cache)} = B·(d + 2h + q)·4 bytes\n"
                 f"for B={B}, d={d}, h={h}, q={q}, float32, and autograd also keeps the targets "
                 f"y ({format_bytes(stored['y'])}, int64); green = kept until backward has "
                 "used it" + _measured(sizes, cache + stored["y"]), fontsize=10)
    return fig


def _measured(sizes: dict, notes_bytes: int) -> str:
    """A third title line: what the trial drawn actually stored, next to the notes' cache
    (autograd keeps what each backward formula reads: for ReLU, tanh and sigmoid that is
    h, from which φ′ is computed, not z)."""
    saved = sizes.get("saved_bytes")
    if saved is None or saved != saved:         # no trial, or not measured
        return ""
    return (f"\nmeasured at these sizes (φ = {sizes['phi']}): autograd stored "
            f"{format_bytes(saved)}, the notes' cache and y {format_bytes(notes_bytes)} "
            "(stored per module: see its figure)")
