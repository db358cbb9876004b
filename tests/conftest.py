import os

import pytest
import torch


def pytest_configure(config):
    # make test runs the files in parallel (pytest-xdist): each worker takes its share of
    # the cores, so timed tests do not run on oversubscribed threads; a thread count the
    # environment sets (.ci/run's OMP_NUM_THREADS settings) is left as it is
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="requires_cuda: no CUDA device on this machine")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
