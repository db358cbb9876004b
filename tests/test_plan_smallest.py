"""The smallest feasible budget (issue 21, item 3; NOTE [ The smallest feasible budget ],
memprop.checkpoint.planning.planner): one figure whatever infeasible budget was asked, and one
the planner found and applies: planning at exactly it returns a plan whose measured
peak is at most it."""

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.checkpoint import remove_strategy
from memprop.checkpoint.planning.planner import plan
from memprop.errors import BudgetError
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload

MiB = 2**20


def smallest_of(model, batch, budget, loss_fn) -> int:
    with pytest.raises(BudgetError) as info:
        plan(model, batch, budget, loss_fn=loss_fn)
    smallest = info.value.smallest_feasible_bytes
    assert "the smallest feasible budget found is about" in str(info.value)
    assert f"({smallest} bytes, with " in str(info.value)
    return smallest


@pytest.mark.parametrize("name,sizes,batch,expected,asked,above", [
    # the case (memprop plan --model hf:gpt2, batch 32): 3 MiB said 27.1 MiB
    # (full), 20 MiB said 21.5 MiB, and 26 MiB found a plan at 25.8 MiB. 21.5 MiB is the
    # least peak of remat's lowest candidates (remat:addmm#1+addmm#3+addmm#7+bmm#1)
    pytest.param("hf:gpt2", {}, 32, 22537992, (3 * MiB, 20 * MiB), 26 * MiB,
                 marks=pytest.mark.slow),
    # a zoo transformer (plain peak 2.5 MiB): the chain's candidates and remat's
    ("transformer", dict(depth=4, d_model=32, heads=4, seq_len=32, vocab=64), 8, None, (),
     2 * MiB),
])
def test_every_infeasible_budget_reports_one_smallest_that_plans_and_fits(
        name, sizes, batch, expected, asked, above):
    cfg = model_config(name, **sizes)
    with FakeTensorMode():            # planned as `memprop plan` plans: on fake tensors
        fake, fake_batch = cfg.build(), cfg.example_batch(batch)
    smallest = smallest_of(fake, fake_batch, 1, cfg.loss)
    if expected is not None:
        assert smallest == expected
    for budget in (*asked, smallest // 2, smallest - 1):
        assert smallest_of(fake, fake_batch, budget, cfg.loss) == smallest, budget
    # a budget above it: a plan, and none below the smallest (the 25.8 MiB plan
    # at 26 MiB stood below the 27.1 MiB said to be the smallest)
    assert smallest <= plan(fake, fake_batch, above, loss_fn=cfg.loss).predicted_peak_bytes <= above
    p = plan(fake, fake_batch, smallest, loss_fn=cfg.loss)
    assert p.predicted_peak_bytes <= smallest
    model, data = build_workload(cfg, batch)
    p.apply(model)
    measured = measure_step(model, data, repeats=1, inference=False, loss_fn=cfg.loss)
    remove_strategy(model)
    assert measured.peak_bytes == p.predicted_peak_bytes <= smallest
