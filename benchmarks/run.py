"""Run memprop's benchmarks and write their results files.

    python benchmarks/run.py [NAME ...]     # default: all but the named-only; `make bench`
    python benchmarks/run.py architectures  # every transformers architecture (hours)

Each ``bench_<name>.py`` beside this file has ``run() -> dict`` (JSON-able, with a
``table`` list of rows) and ``TARGETS`` text, and may have ``markdown(result) -> str``
for its own report (bench_architectures: counts, then a row per architecture), and
``NAMED_ONLY = True`` to run only when named (bench_architectures: hours). Results
go to ``benchmarks/results/<name>.json`` and a readable ``<name>.md``. Ratios are measured
side by side in one run (interleaved rounds, medians), because machines here are
shared and noisy; absolute times are reported but not compared across runs.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import platform
import sys
import time

import pandas as pd
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(names: list[str]) -> int:
    names = names or sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py")
                            if "\nNAMED_ONLY = True" not in p.read_text())
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    for name in names:
        module = importlib.import_module(f"bench_{name}")
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        result = module.run()
        result["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                                 "machine": platform.machine(), "threads": torch.get_num_threads(),
                                 "seconds": round(time.perf_counter() - t0, 1)}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
        table = pd.DataFrame(result["table"])
        if hasattr(module, "markdown"):
            (out / f"{name}.md").write_text(module.markdown(result))
        else:
            rendered = (table.to_markdown(index=False) if _has_tabulate()
                        else "```\n" + table.to_string(index=False) + "\n```")
            md = [f"# benchmark: {name}", "", module.TARGETS.strip(), "", rendered, "",
                  *(f"- {v}" for v in result.get("verdicts", [])), "",
                  "```", json.dumps(result["environment"]), "```"]
            (out / f"{name}.md").write_text("\n".join(md) + "\n")
            print(table.to_string(index=False))
        for line in result.get("verdicts", []):
            print(line)
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
