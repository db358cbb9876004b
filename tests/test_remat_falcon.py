"""remat:- on a forward that writes in place into a view of a matmul's output (Falcon's
parallel attention: ``mlp_output += attention_output``, where ``mlp_output`` is
``_unsafe_view(mm(...))``): backward rebuilds that matmul output once and holds it for
every rebuild needing it, so a replayed write must not reach the held output through
the view. Gradients bitwise those of the plain step (memprop.checkpoint.forms.remat)."""

import copy

import pytest
import torch
from helpers import ParallelChain

from memprop.checkpoint import apply_strategy
from memprop.models import model_config


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _differ(model, loss_fn, strategy="remat:-"):
    """(loss equal?, names of parameters whose gradients differ) of ``strategy`` against
    the plain step, on the same weights."""
    other = copy.deepcopy(model)                 # before the strategy is applied
    apply_strategy(other, strategy)
    plain, remat = _loss_and_grads(model, loss_fn), _loss_and_grads(other, loss_fn)
    assert plain[1].keys() == remat[1].keys()
    return (torch.equal(plain[0], remat[0]),
            [n for n in plain[1] if not torch.equal(plain[1][n], remat[1][n])])


def test_in_place_write_into_a_view_of_a_rebuilt_matmul_output():
    torch.manual_seed(0)
    model = ParallelChain()
    x = torch.randn(2, 8, 16)
    same_loss, differ = _differ(model, lambda m: m(x).square().mean())
    assert same_loss and differ == []


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_falcon_remat_gradients_are_bitwise(dropout):
    pytest.importorskip("transformers")
    cfg = model_config("hf:falcon", num_hidden_layers=3, hidden_size=64, seq_len=16,
                       hidden_dropout=dropout, attention_dropout=dropout)
    torch.manual_seed(0)
    model = cfg.build()
    assert model.training
    assert model.config.parallel_attn and not model.config.new_decoder_architecture
    batch = cfg.example_batch(4)                 # odd rows left-padded (the default)
    assert (batch["attention_mask"] == 0).any()
    same_loss, differ = _differ(model, lambda m: cfg.loss(m, batch))
    assert same_loss and differ == [], f"gradients differ: {differ}"
