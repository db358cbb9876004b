"""The stored-intermediate recorder: bytes from shapes, dedupe by storage, kinds, ops."""

import itertools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from memprop.models import model_config, training_loss
from memprop.predict import predict_saved_bytes
from memprop.saved import SavedTensorRecorder
from memprop.workload import build_workload, measure


def record(config, batch, dtype=torch.float32):
    model, b = build_workload(config, batch, dtype=dtype)
    with SavedTensorRecorder(model, inputs=(*b[0], b[1])) as rec:
        loss = training_loss(model, b)
        rec.add_root(loss)
    return rec


def test_relu_output_shared_with_next_linear_counts_once():
    # x (B, 3) -> Linear(3, 5) -> ReLU -> Linear(5, 2): ReLU saves h, the 2nd Linear saves
    # h as its input and W2ᵀ: h is ONE storage of B·5·4 bytes, saved twice.
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    x = torch.randn(4, 3)
    with SavedTensorRecorder(net, inputs=(x,)) as rec:
        out = net(x).sum()
        rec.add_root(out)
    frame = rec.frame()
    h = frame[frame.module == "1"]
    assert len(h) == 1 and h.saves.item() == 2 and h.saved_bytes.item() == 4 * 5 * 4
    assert h.op.item() == "ReluBackward0"                 # the first saver, not the Addmm
    assert rec.saved_bytes == 4 * 3 * 4 + 4 * 5 * 4       # x (input) + h
    assert rec.param_saved_bytes == 5 * 2 * 4             # W2ᵀ views W2's storage: apart
    assert set(frame.kind) == {"input", "activation", "parameter"}


@pytest.mark.parametrize("phi,depth,width,batch", [
    *itertools.product(["relu", "tanh", "sigmoid", "gelu"], [1, 3], [16], [8]),
    ("relu", 6, 33, 5), ("gelu", 2, 64, 17)])
def test_mlp_measured_equals_closed_form_exactly(phi, depth, width, batch):
    cfg = model_config("mlp", depth=depth, width=width, d_in=12, d_out=7, phi=phi)
    rec = record(cfg, batch)
    pred = predict_saved_bytes(cfg, batch)
    assert rec.bytes_of("input") == pred["input"]
    assert rec.bytes_of("activation") == pred["activation"]
    assert rec.bytes_of("parameter") == pred["parameter"]
    assert rec.saved_bytes == pred["saved_bytes"]


@pytest.mark.parametrize("phi", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("h,batch,dtype", [(16, 4, torch.float32), (50, 9, torch.float64)])
def test_d2l_measured_equals_closed_form_exactly(phi, h, batch, dtype):
    cfg = model_config("d2l_mlp", d=30, h=h, q=6, phi=phi)
    rec = record(cfg, batch, dtype)
    pred = predict_saved_bytes(cfg, batch, dtype=dtype)
    assert (rec.saved_bytes, rec.param_saved_bytes) == (pred["saved_bytes"], pred["parameter"])


def test_stored_bytes_linear_in_batch_and_depth_with_slope_from_shapes():
    w, s = 32, 4
    by_batch = [record(model_config("mlp", depth=4, width=w, d_in=10, d_out=5), B).saved_bytes
                for B in (2, 4, 8, 16)]
    # per example: x (10·4) + target (8) + 4 φ outputs (4·w·4) + log-softmax (5·4)
    slope_b = 10 * s + 8 + 4 * w * s + 5 * s
    steps = [b - a for a, b in zip(by_batch, by_batch[1:])]
    assert steps == [slope_b * 2, slope_b * 4, slope_b * 8]
    by_depth = [record(model_config("mlp", depth=L, width=w, d_in=10, d_out=5), 8).saved_bytes
                for L in (1, 2, 4, 8)]
    slope_l = 8 * w * s  # one φ output of (B=8, w) per layer
    assert [b - a for a, b in zip(by_depth, by_depth[1:])] == [slope_l, 2 * slope_l, 4 * slope_l]


def test_non_reentrant_checkpoint_retains_only_its_inputs():
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
                                 for _ in range(4))
    x = torch.randn(6, 8, requires_grad=True)

    def run(use_ckpt):
        with SavedTensorRecorder(blocks, inputs=(x,)) as rec:
            h = x
            for b in blocks:
                h = checkpoint(b, h, use_reentrant=False) if use_ckpt else b(h)
            rec.add_root(h.sum())
        return rec

    plain, ckpt = run(False), run(True)
    act = 6 * 8 * 4
    # plain: every Linear saves its input (x, then tanh outputs), every tanh its output;
    # tanh_i's output is Linear_{i+1}'s input: x + 4 tanh outputs
    assert plain.saved_bytes == 5 * act
    # checkpointed: only each block's input is kept (x and tanh outputs 1..3)
    assert ckpt.saved_bytes == 4 * act
    assert ckpt.param_saved_bytes == 0


def test_recorder_kinds_without_model_treat_leaves_as_parameters():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    with SavedTensorRecorder() as rec:
        y = (x @ w).sigmoid()
        rec.add_root(y.sum())
    kinds = dict(zip(rec.frame().op, rec.frame().kind))
    assert kinds == {"MmBackward0": "activation", "SigmoidBackward0": "activation"}
    assert rec.saved_bytes == 2 * 3 * 4 * 2   # x and sigmoid output; w is not saved


def test_measure_reports_per_module_table_summing_to_total():
    m = measure(model_config("transformer", depth=2, d_model=16, heads=2, seq_len=8, vocab=20),
                3, repeats=1)
    table = m.saved_per_module
    assert table.saved_bytes.sum() == m.saved_bytes
    assert table.saved_count.sum() == m.saved_count
    assert list(table.module[:2]) == ["embed", "blocks.0.ln1"]
