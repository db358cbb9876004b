"""The allocator settings a simulation runs under (``PYTORCH_CUDA_ALLOC_CONF`` and the
device's memory), validated when built."""

from __future__ import annotations

import dataclasses

from memprop.errors import ConfigError
from memprop.units import parse_size

__all__ = ["AllocatorConfig", "parse_alloc_conf", "ALLOC_CONF_KEYS"]

ALLOC_CONF_KEYS = ("max_split_size_mb", "roundup_power2_divisions", "expandable_segments")
_UNLIMITED = 1 << 64          # max_split_size unset: SIZE_MAX in the C++


@dataclasses.dataclass(frozen=True, kw_only=True)
class AllocatorConfig:
    """Settings of one simulated device.

    ``max_split_size_mb``: ``PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:N`` (MiB, > 20);
    None: unset (no block is oversize). ``roundup_power2_divisions``: the same option, one
    value for every size (a power of two; 0 or 1: off). ``expandable_segments``: one
    growing segment per pool. ``capacity_bytes``: what cudaMalloc can obtain on the
    device (its total memory less the CUDA context and other processes); None:
    unlimited. ``memory_fraction``: ``torch.cuda.set_per_process_memory_fraction``, a
    limit of ``int(fraction x capacity_bytes)`` on reserved bytes (needs
    ``capacity_bytes``; torch takes the fraction of the device's total memory, context
    included, so give the total here when the fraction is what matters)."""

    max_split_size_mb: int | None = None
    roundup_power2_divisions: int = 0
    expandable_segments: bool = False
    capacity_bytes: int | None = None
    memory_fraction: float | None = None

    def __post_init__(self) -> None:
        where = "memprop.allocator:"
        mb = self.max_split_size_mb
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb <= 20):
            raise ConfigError(f"{where} max_split_size_mb = {mb!r} is not allowed; torch "
                              "requires an integer > 20 (MiB), or None for unset")
        d = self.roundup_power2_divisions
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or (d > 1 and d & (d - 1)):
            raise ConfigError(f"{where} roundup_power2_divisions = {d!r} is not allowed; "
                              "give a power of two (e.g. 4), or 0 for off")
        cap = self.capacity_bytes
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
            raise ConfigError(f"{where} capacity_bytes = {cap!r} is not allowed; give a "
                              "positive number of bytes, or None for unlimited")
        frac = self.memory_fraction
        if frac is not None:
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) \
                    or not 0 < frac <= 1:
                raise ConfigError(f"{where} memory_fraction = {frac!r} is not allowed; "
                                  "give a number in (0, 1]")
            if cap is None:
                raise ConfigError(f"{where} memory_fraction = {frac} needs capacity_bytes "
                                  "(the fraction is of the device's memory)")

    @property
    def max_split_size(self) -> int:
        """Bytes; blocks of at least this size are oversize (unset: no limit)."""
        return _UNLIMITED if self.max_split_size_mb is None else self.max_split_size_mb << 20

    @property
    def allowed_bytes(self) -> int | None:
        """The reserved-bytes limit ``set_per_process_memory_fraction`` sets, or None."""
        if self.memory_fraction is None or self.capacity_bytes is None:
            return None
        return int(self.memory_fraction * self.capacity_bytes)


def parse_alloc_conf(text: str, **fields) -> AllocatorConfig:
    """An ``AllocatorConfig`` from ``PYTORCH_CUDA_ALLOC_CONF`` syntax
    (``"expandable_segments:True,max_split_size_mb:128"``) plus keyword ``fields``
    (``capacity_bytes`` as bytes or a size such as ``"80GiB"``)."""
    options: dict = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = (s.strip() for s in item.partition(":"))
        if not sep or key not in ALLOC_CONF_KEYS:
            raise ConfigError(f"memprop.allocator: alloc conf item {item!r} is not one of "
                              f"{', '.join(k + ':VALUE' for k in ALLOC_CONF_KEYS)}; e.g. "
                              "expandable_segments:True,max_split_size_mb:128")
        if key == "expandable_segments":
            if value not in ("True", "False"):
                raise ConfigError(f"memprop.allocator: expandable_segments:{value} is not "
                                  "allowed; choose True or False")
            options[key] = value == "True"
        else:
            try:
                options[key] = int(value)
            except ValueError:
                raise ConfigError(f"memprop.allocator: {key}:{value} is not an integer, "
                                  f"e.g. {key}:{128 if key.startswith('max') else 4}") from None
    if isinstance(fields.get("capacity_bytes"), str):
        fields["capacity_bytes"] = parse_size(fields["capacity_bytes"], positive=True)
    return AllocatorConfig(**options, **fields)
