"""The model zoo: every model trains one step on CPU; bad configs are rejected clearly."""

import sys
import textwrap

import pytest
import torch

from memprop.errors import ConfigError
from memprop.models import MODELS, model_config, training_loss

SMALL = {
    "d2l_mlp": dict(d=12, h=8, q=3),
    "mlp": dict(depth=3, width=16, d_in=12, d_out=5),
    "transformer": dict(depth=2, d_model=16, heads=2, seq_len=8, vocab=17, dropout=0.1),
    "convnet": dict(depth=2, channels=4, image_size=8),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_runs_forward_and_backward(name):
    cfg = model_config(name, **SMALL[name])
    model = cfg.build()
    batch = cfg.example_batch(4)
    loss = training_loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) >= 2


def test_builds_are_deterministic_and_batches_reproducible():
    cfg = model_config("mlp", **SMALL["mlp"])
    a, b = cfg.build(seed=3), cfg.build(seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    (x1,), y1 = cfg.example_batch(4, seed=1)
    (x2,), y2 = cfg.example_batch(4, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_d2l_mlp_is_the_notes_network():
    cfg = model_config("d2l_mlp", d=6, h=4, q=3, lam=0.5, phi="tanh")
    model = cfg.build(dtype=torch.float64)
    assert [n for n, _ in model.named_parameters()] == ["blocks.0.linear.weight", "blocks.1.weight"]
    assert model.W1.shape == (4, 6) and model.W2.shape == (3, 4)  # no bias terms
    (x,), y = cfg.example_batch(5, dtype=torch.float64)
    J = training_loss(model, ((x,), y))
    o = torch.tanh(x @ model.W1.T) @ model.W2.T
    expected = torch.nn.functional.cross_entropy(o, y) + 0.25 * (
        model.W1.pow(2).sum() + model.W2.pow(2).sum())
    torch.testing.assert_close(J, expected)


@pytest.mark.parametrize("name,fields,message", [
    ("mlp", dict(depth=0), "mlp.depth = 0 is not allowed; depth must be an integer >= 1"),
    ("mlp", dict(width=-3), "mlp.width = -3 is not allowed; width must be an integer >= 1"),
    ("mlp", dict(phi="swish"), "phi must be one of: relu, tanh, sigmoid, gelu"),
    ("mlp", dict(depth=2.5), "mlp.depth = 2.5"),
    ("mlp", dict(dept=3), "mlp has no field 'dept' (did you mean 'depth'?)"),
    ("transformer", dict(heads=5), "transformer.heads = 5 is not allowed; heads must be a "
                                   "divisor of d_model = 128"),
    ("transformer", dict(dropout=1.0), "dropout must be a number in [0.0, 1.0)"),
    ("convnet", dict(classes=1), "convnet.classes = 1"),
    ("d2l_mlp", dict(phi="gelu"), "phi must be one of: relu, tanh, sigmoid"),
    ("d2l_mlp", dict(lam=-1), "d2l_mlp.lam = -1"),
    ("mpl", {}, "unknown model 'mpl' (did you mean 'mlp'?)"),
    ("nosuchpkg.mod:make", dict(input_shape=(3,)), "cannot import 'nosuchpkg.mod'"),
])
def test_bad_configs_name_field_value_and_allowed(name, fields, message):
    with pytest.raises(ConfigError) as info:
        model_config(name, **fields)
    assert message in str(info.value)


def test_bad_batch_size():
    with pytest.raises(ConfigError, match="batch size 0"):
        model_config("mlp").example_batch(0)


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        def tiny(width=8):
            return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = model_config("mymodels:tiny", input_shape=(4,), kwargs=(("width", 6),))
    model = cfg.build()
    batch = cfg.example_batch(3)
    loss = training_loss(model, batch)
    out = model(*batch[0])
    torch.testing.assert_close(loss, out.pow(2).mean())  # the synthetic objective
    assert model.module[0].out_features == 6
    with pytest.raises(ConfigError, match="input_shape"):    # a bare module needs a shape
        model_config("mymodels:tiny", input_shape=()).build()
    with pytest.raises(ConfigError, match="input_shape"):
        model_config("mymodels:tiny", input_shape=(0,))
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        model_config("mymodels:nope", input_shape=(4,))
    sys.modules.pop("mymodels", None)
