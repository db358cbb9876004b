"""``convnet``: a stack of conv blocks with BatchNorm on images, then a linear classifier.

    images (B, 3, S, S) -> stem conv -> [Conv3x3 -> BatchNorm -> ReLU] × depth
                        -> global average pool -> Linear(classes) -> cross-entropy

Every block keeps the resolution and channel count, so stored bytes per block are equal.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from memprop.models.base import Batch, ModelConfig, ZooModel

__all__ = ["ConvNetConfig", "ConvNet"]


class ConvBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):  # (B, C, S, S)
        return self.act(self.bn(self.conv(x)))


class ConvNet(ZooModel):
    def __init__(self, cfg: "ConvNetConfig"):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(cfg.channels) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.channels, cfg.classes)

    def forward(self, images):  # (B, in, S, S) -> (B, classes)
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvNetConfig(ModelConfig):
    name = "convnet"
    depth: int = 4
    channels: int = 32
    image_size: int = 32
    in_channels: int = 3
    classes: int = 10

    def _validate(self):
        for f in ("depth", "channels", "image_size", "in_channels"):
            self._int_at_least(f, 1)
        self._int_at_least("classes", 2)

    def _build(self) -> ConvNet:
        return ConvNet(self)

    def _batch(self, batch_size, gen, dtype) -> Batch:
        x = torch.randn(batch_size, self.in_channels, self.image_size, self.image_size,
                        generator=gen, dtype=dtype)
        y = torch.randint(0, self.classes, (batch_size,), generator=gen)
        return (x,), y
