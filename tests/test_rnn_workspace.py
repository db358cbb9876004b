"""NOTE [ oneDNN RNN workspaces, measured ] (memprop.fake): a CPU LSTM layer saves a
oneDNN workspace that torch's meta kernel sizes 0 bytes (the estimate of the 3-layer
LSTM below was 276848 B for a measured 1248624 B); the estimate measures it once and
then equals the measurement to the byte, and so do the planner's plans. A GRU runs
other kernels and was right before: it stays so."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memprop
from memprop.checkpoint import plan


class _Stacked(nn.Module):
    """A user's recurrent classifier: a 3-layer ``nn.LSTM`` (or GRU) and a head."""

    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(16, 32, num_layers=3, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(32, 32, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class _Chain(nn.Module):
    """LSTM layers as a chain of blocks the planner can checkpoint."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, -1])


def _batch():
    torch.manual_seed(0)
    return torch.randn(8, 20, 16), torch.randint(0, 5, (8,))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_estimate_of_a_recurrent_model_counts_its_workspaces(kind):
    torch.manual_seed(0)
    model, batch = _Stacked(kind), _batch()
    m = memprop.measure_step(model, batch, loss_fn=F.cross_entropy, repeats=1)
    e = memprop.estimate(model, batch, loss_fn=F.cross_entropy)
    assert (e.saved_bytes, e.peak_bytes, e.inference_peak_bytes) == (
        m.saved_bytes, m.peak_bytes, m.inference_peak_bytes)
    # the workspaces are most of what the step stores: far above the layers' outputs
    outputs = 3 * 8 * 20 * 32 * 4
    assert m.saved_bytes > 2 * outputs


@pytest.mark.parametrize("metric", ["peak", "stored"])
def test_plans_of_a_recurrent_chain_are_measured_as_predicted(metric):
    torch.manual_seed(0)
    model, batch = _Chain(), _batch()
    plain = memprop.measure_step(model, batch, loss_fn=F.cross_entropy, repeats=1)
    budget = int((plain.peak_bytes if metric == "peak" else plain.saved_bytes) * 0.6)
    p = plan(model, batch, budget, loss_fn=F.cross_entropy, metric=metric)
    assert p.spec != "none"
    checkpointed = copy.deepcopy(model)
    p.apply(checkpointed)
    got = memprop.measure_step(checkpointed, batch, loss_fn=F.cross_entropy, repeats=1)
    assert (got.peak_bytes, got.saved_bytes) == (p.predicted_peak_bytes,
                                                 p.predicted_saved_bytes)
    assert (got.peak_bytes if metric == "peak" else got.saved_bytes) <= budget
