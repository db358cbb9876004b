"""Claim C3: the notes' gradient formulas are exactly what autograd computes."""

import pytest
import torch

from memprop import backprop as bp
from memprop.cli.backprop_cmd import gather_backprop, render_backprop


@pytest.mark.parametrize("phi", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("seed", range(4))
def test_hand_gradients_equal_autograd_in_float64(phi, seed):
    g = torch.Generator().manual_seed(seed)
    B, d, h, q = (int(v) for v in torch.randint(1, 24, (4,), generator=g))
    q = max(q, 2)
    lam = float(torch.rand((), generator=g))
    x = torch.randn(B, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, q, (B,), generator=g)
    W1 = torch.randn(h, d, dtype=torch.float64, generator=g)
    W2 = torch.randn(q, h, dtype=torch.float64, generator=g)

    cache = bp.forward(x, y, W1, W2, phi=phi, lam=lam)
    hand = bp.backward(cache, y, W1, W2, phi=phi, lam=lam)
    auto = bp.autograd_gradients(x, y, W1, W2, phi=phi, lam=lam)
    for key in ("dJ_do", "dJ_dh", "dJ_dz", "dJ_dW1", "dJ_dW2"):
        torch.testing.assert_close(getattr(hand, key), auto[key], rtol=0, atol=1e-10)
    assert hand.dJ_dL == 1.0 and hand.dJ_ds == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cache_holds_exactly_x_z_h_o_with_bytes_from_shapes(dtype):
    B, d, h, q = 5, 7, 3, 4
    x = torch.randn(B, d, dtype=dtype)
    cache = bp.forward(x, torch.tensor([0, 1, 2, 3, 0]), torch.randn(h, d, dtype=dtype),
                       torch.randn(q, h, dtype=dtype), phi="tanh", lam=0.1)
    assert list(cache.stored) == ["x", "z", "h", "o"]
    assert [tuple(t.shape) for t in cache.stored.values()] == [(B, d), (B, h), (B, h), (B, q)]
    itemsize = 4 if dtype == torch.float32 else 8
    assert cache.stored_bytes == B * (d + 2 * h + q) * itemsize  # 5·17·itemsize
    torch.testing.assert_close(cache.J, cache.L + cache.s)


def test_regulariser_is_half_lambda_frobenius_squared():
    W1, W2 = torch.ones(3, 2, dtype=torch.float64), 2 * torch.ones(4, 3, dtype=torch.float64)
    cache = bp.forward(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]), W1, W2, lam=0.5)
    assert cache.s.item() == pytest.approx(0.5 / 2 * (6 * 1 + 12 * 4))


def test_walkthrough_numbers():
    w = gather_backprop(d=20, h=8, q=4, batch=3, phi="relu", lam=1e-3, dtype=torch.float64)
    assert w.stored_bytes == w.formula_bytes == 3 * (20 + 16 + 4) * 8
    assert list(w.forward.variable) == ["x", "z", "h", "o"]
    assert (w.backward.max_abs_diff < 1e-12).all()
    # autograd's own saved set: x (input), h (relu output = W2's input), log-softmax,
    # the targets, and NLL's total weight (a 0-dim tensor); W1, W2 counted apart.
    saved = w.autograd_saved
    acts = saved[saved.kind.isin(["activation", "input"])]
    assert acts.saved_bytes.sum() == w.autograd_saved_bytes == (
        3 * 20 * 8 + 3 * 8 * 8 + 3 * 4 * 8 + 3 * 8 + 8)
    assert set(saved[saved.kind == "parameter"].saved_bytes) == {8 * 20 * 8, 4 * 8 * 8}
    text = render_backprop(w)
    assert "∂J/∂W1 = (∂J/∂z)ᵀ x + λ W1" in text and "ReluBackward0" in text


@pytest.mark.parametrize("phi,op", [("relu", "ReluBackward0"), ("tanh", "TanhBackward0"),
                                    ("sigmoid", "SigmoidBackward0")])
def test_autograd_keeps_h_not_z(phi, op):
    """φ' is computed from φ(z) for these φ: autograd keeps h (shared with W2's matmul),
    and z is stored by nobody."""
    w = gather_backprop(d=6, h=5, q=3, batch=2, phi=phi)
    hidden = w.autograd_saved[w.autograd_saved["module"] == "blocks.0.phi"]
    assert len(hidden) == 1 and hidden.saves.iloc[0] == 2  # φ's output, and W2's input
    assert hidden.op.iloc[0] == op and hidden["shape"].iloc[0] == "(2, 5)"   # (B, h)
    assert not (w.autograd_saved["module"] == "blocks.0.linear").any() or (
        w.autograd_saved.query("module == 'blocks.0.linear'").kind == "input").all()
