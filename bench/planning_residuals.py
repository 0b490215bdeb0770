"""The memory estimator against every GPU measurement of the trainer benchmark.

    python bench/planning_residuals.py            # markdown table for docs/planning.md

Each arm of each `bench/results/{h100,h200}-*.json` is described as the run it was (model
shape, method, batch, max length, layout, checkpointing, the data's exact lengths) and
estimated with `finetune_trainer.planning.memory`; the residual is estimate / measured peak
(`max_memory_allocated`). The tests (tests/unit/test_planning_accuracy.py) use the same rows.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from finetune_trainer.planning.memory import GIB, Layout, Setup, estimate
from finetune_trainer.planning.shape import ModelShape, ParamCounts

RESULTS = Path(__file__).resolve().parent / "results"
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
# arm -> (layout, liger) ; ours-* follow the trainer's defaults but for the switch they name
ARM_LAYOUT: dict[str, Layout] = {
    "baseline": "padded-max",
    "ours": "padding-free",
    "ours-liger": "padding-free",
    "ours-noliger": "padding-free",
    "ours-padded": "padded",
    "ours-packed": "packed",
}


@dataclass(frozen=True)
class Row:
    """One measured arm and its estimate."""

    file: str
    arm: str
    method: str
    batch: int
    checkpointing: bool
    layout: Layout
    tokens: int
    measured: int
    estimated: int

    @property
    def ratio(self) -> float:
        """Estimate / measured peak."""
        return self.estimated / self.measured

    @property
    def worst_case_reached(self) -> bool:
        """Every batch of the run had the worst case's tokens (padded to max_length)."""
        return self.layout == "padded-max"


def counts(shape: ModelShape, method: str) -> ParamCounts:
    """The benchmark's model: LoRA r=16 on q/k/v/o (or all parameters for full)."""
    total = shape.total_params()
    lora = 0 if method == "full" else shape.lora_params(16, LORA_MODULES)
    quantizable = shape.linear_params() - shape.hidden * shape.vocab
    largest = shape.hidden * shape.intermediate
    trainable = total if method == "full" else lora
    return ParamCounts(total + (0 if method == "full" else lora), trainable, quantizable, largest)


def setup_of(doc: dict[str, Any], arm: str) -> Setup:
    """The Setup of one arm of a benchmark result."""
    s = doc["settings"]
    n_train = s["steps"] * s["batch"]
    lengths = benchlib.sample_lengths(n_train + s["eval_examples"], s["seq"], s["seed"])
    method = s["method"]
    return Setup(
        method=method,
        compute_bytes=2,
        weight_bytes=2,
        batch_size=s["batch"],
        max_seq_length=s["seq"],
        layout=ARM_LAYOUT[arm],
        gradient_checkpointing=bool(doc["gradient_checkpointing"]),
        quant_bits=4 if method == "qlora" else None,
        double_quant=True,
        liger=arm == "ours-liger",
        lengths=lengths[:n_train],
    )


def rows() -> list[Row]:
    """Every measured GPU arm with its estimate (the highest peak of an arm's rounds)."""
    out = []
    for path in sorted(RESULTS.glob("h[12]00-*.json")):
        doc = json.loads(path.read_text())
        shape = benchlib.SHAPES[doc["settings"]["model"]]
        peaks: dict[str, int] = {}
        for r in doc["results"]:
            if r.get("peak_bytes"):
                peaks[r["arm"]] = max(peaks.get(r["arm"], 0), int(r["peak_bytes"]))
        for arm, peak in peaks.items():
            setup = setup_of(doc, arm)
            est = estimate(shape, counts(shape, setup.method), setup)
            out.append(
                Row(
                    path.name,
                    arm,
                    setup.method,
                    setup.batch_size,
                    setup.gradient_checkpointing,
                    setup.layout,
                    est.tokens,
                    peak,
                    est.allocated,
                )
            )
    return out


def table(found: list[Row]) -> str:
    """The residuals as a markdown table."""
    lines = [
        "| measurement | arm | method | batch | checkpointing | layout | worst-case tokens "
        "| measured GiB | estimated GiB | estimate / measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        lines.append(
            f"| {r.file} | {r.arm} | {r.method} | {r.batch} | {'on' if r.checkpointing else 'off'}"
            f" | {r.layout} | {r.tokens:,} | {r.measured / GIB:.2f} | {r.estimated / GIB:.2f} "
            f"| {r.ratio:.2f}{'' if not r.worst_case_reached else ' (worst case)'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows()))
