"""``memprop profile --snapshot FILE.pickle``: the step's allocations replayed through the
simulated CUDA caching allocator (memprop.allocator), written in the format of
``torch.cuda.memory._snapshot()`` for pytorch.org/memory_viz. The options are checked
before anything is measured; memprop.allocator is loaded only when a command runs."""

from __future__ import annotations

from memprop.cli._common import check_output_file, size
from memprop.errors import ConfigError
from memprop.units import format_bytes

__all__ = ["add_snapshot_options", "snapshot_request", "write_profile_snapshot"]


def add_snapshot_options(p) -> None:
    p.add_argument("--snapshot", metavar="FILE.pickle", help="replay the step's allocations "
                   "through a simulation of PyTorch's CUDA caching allocator (not yet "
                   "validated against real GPU traces) and write its state and history in "
                   "the format of torch.cuda.memory._snapshot(), for pytorch.org/memory_viz "
                   "(default: not written)")
    p.add_argument("--alloc-conf", metavar="CONF", default=None, help="with --snapshot: "
                   "the simulated PYTORCH_CUDA_ALLOC_CONF, e.g. expandable_segments:True,"
                   "max_split_size_mb:128 (default: torch's defaults)")
    p.add_argument("--device-memory", metavar="SIZE", type=size, default=None,
                   help="with --snapshot: what cudaMalloc can obtain on the simulated "
                        "device, e.g. 80GiB; past it the replay reports the request that "
                        "runs out of memory (default: unlimited)")


def snapshot_request(args):
    """(output path, AllocatorConfig) for ``--snapshot``, or None without it; a
    ConfigError naming the option for anything wrong."""
    if args.snapshot is None:
        given = [o for o, v in (("--alloc-conf", args.alloc_conf),
                                ("--device-memory", args.device_memory)) if v is not None]
        if given:
            raise ConfigError(f"memprop profile: {' and '.join(given)} "
                              f"{'apply' if len(given) > 1 else 'applies'} only to the "
                              "simulated allocator; add --snapshot FILE.pickle")
        return None
    sharded = [f"--{name}" for name in ("fsdp", "replicate", "tp")
               if getattr(args, name, None) is not None]
    if sharded:
        raise ConfigError(f"memprop profile: --snapshot does not take {', '.join(sharded)} "
                          "yet; snapshot one device's step (per-rank snapshots are not "
                          "written yet: replay each rank's Measurement.allocations with "
                          "memprop.allocator.replay_measurement)")
    from memprop.allocator import parse_alloc_conf

    path = check_output_file(args.snapshot, "--snapshot", "profile")
    try:
        config = parse_alloc_conf(args.alloc_conf or "", capacity_bytes=args.device_memory)
    except ConfigError as exc:
        raise ConfigError(f"memprop profile: --alloc-conf {args.alloc_conf!r}: "
                          f"{str(exc).removeprefix('memprop.allocator: ')}") from None
    return path, config


def write_profile_snapshot(result, request, *, label: str) -> str:
    """Replay ``result.allocations`` under the requested config, write the snapshot and
    return the lines that say what it holds (the caller prints them)."""
    from memprop.allocator import replay_measurement, write_snapshot

    path, config = request
    run = replay_measurement(result, config)
    r = run.report
    write_snapshot(run.allocator, path, meta={
        "label": label, "predicted": bool(result.predicted),
        "validated": False, "report": {k: v for k, v in vars(r).items()
                                       if k not in ("oom", "config")}})
    line = (f"allocator snapshot (simulated, not yet validated on a GPU): max allocated "
            f"{format_bytes(r.max_allocated_bytes)}, max reserved "
            f"{format_bytes(r.max_reserved_bytes)} ({r.max_reserved_bytes} bytes), "
            f"{r.segments} segment{'s' if r.segments != 1 else ''}; written to {path}")
    if r.oom is not None:
        line += (f"\n  out of memory at storage {r.oom.storage_id} ({r.oom.phase} "
                 f"{r.oom.module or '<step>'} {r.oom.op}): {format_bytes(r.oom.rounded_bytes)}"
                 f" requested with {format_bytes(r.oom.reserved_bytes)} reserved, limit "
                 f"{format_bytes(r.oom.limit_bytes)}")
    return line
