"""`kopf` under tracemalloc, for `operator_bench.py --trace-memory`: on SIGUSR2 it writes the
Python allocations still live to the JSON file named by FINETUNE_BENCH_TRACE_OUT (appending one
snapshot per signal), each attributed to the innermost line of the operator or of kopf that led
to it (a watch event's body parsed by json is charged to whoever keeps it alive: the place that
called into the parser), else to the allocating line.

    python bench/traced_kopf.py run --standalone -m finetune_operator.main

Tracing costs CPU (every allocation is recorded), so a traced run's latencies are not
comparable with an untraced one; its RSS includes the tracer's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

TOP = 25
DEPTH = 16
OURS = ("finetune_operator", f"{os.sep}kopf{os.sep}")


def site(traceback: tracemalloc.Traceback) -> str:
    """The innermost frame of the operator or kopf in a traceback (else the allocating frame)."""
    frames = list(traceback)  # most recent first
    chosen = next((f for f in frames if any(part in f.filename for part in OURS)), frames[0])
    return f"{chosen.filename.rsplit('site-packages/', 1)[-1]}:{chosen.lineno}"


def dump(_signum: int, _frame: FrameType | None) -> None:
    """Append the biggest live allocation sites and the total to the trace file."""
    snapshot = tracemalloc.take_snapshot()  # no filter_traces: it costs more than the rest
    sizes: Counter[str] = Counter()
    # grouped by traceback first: far fewer tracebacks than live blocks to attribute
    for stat in snapshot.statistics("traceback"):
        if stat.traceback[0].filename != tracemalloc.__file__:  # the tracer's own
            sizes[site(stat.traceback)] += stat.size
    out = Path(os.environ["FINETUNE_BENCH_TRACE_OUT"])
    taken = json.loads(out.read_text()) if out.exists() else []
    taken.append(
        {
            "total_bytes": sum(sizes.values()),
            "top": [{"where": where, "bytes": size} for where, size in sizes.most_common(TOP)],
        }
    )
    out.write_text(json.dumps(taken, indent=1))


if __name__ == "__main__":
    tracemalloc.start(DEPTH)
    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["kopf", *sys.argv[1:]]
    runpy.run_module("kopf", run_name="__main__", alter_sys=True)
