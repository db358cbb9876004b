"""Factories for sweep tests: models whose trials crash or hang on purpose."""

import os
import signal
import time

import torch
from torch import nn


class _Dies(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)   # the trial's process dies mid-step
        return self.lin(x)


class _Hangs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        time.sleep(60)
        return self.lin(x)


class _KillsRayWorker(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        # the trial's parent is the Ray task's worker: its death is what a node dying does
        # to a trial (locally the parent would be the sweep itself, so refuse)
        if "RAY_RAYLET_PID" not in os.environ:
            raise RuntimeError("trial_models:kills_ray_worker runs only as a Ray task")
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)                         # PDEATHSIG ends us with our parent
        return self.lin(x)


def kills_ray_worker():
    return _KillsRayWorker()


def dies():
    return _Dies()


def hangs():
    return _Hangs()


def tiny():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


__all__ = ["dies", "hangs", "kills_ray_worker", "tiny", "torch"]
