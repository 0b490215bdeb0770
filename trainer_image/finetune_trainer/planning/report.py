"""`finetune plan`: one run's plan as a JSON-ready dict, and its rendering as tables."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from finetune_trainer import storage
from finetune_trainer.config import RunConfig
from finetune_trainer.planning.gpus import GIB, GPU_TYPES, MFU_RANGE, GpuType, parse_memory
from finetune_trainer.planning.plan import (
    Advice,
    Data,
    ModelFacts,
    Option,
    Resolved,
    Target,
    Timing,
    advise,
    data_of,
    describe_parts,
    precision,
    resolve,
    sequence_lengths,
    timing,
)

log = logging.getLogger(__name__)
DEFAULT_GPU = next(g for g in GPU_TYPES if g.name == "H100")


@dataclass(frozen=True)
class Placement:
    """Where the manifest (or the command line) asks the run to train."""

    gpus: int = 1
    nodes: int = 1
    gpu_type: str | None = None
    memory: str | None = None  # the pod's memory (a CPU run's limit)


def placement_of(doc: dict[str, Any]) -> Placement:
    """resources.{gpus,nodes,gpuType,memory} of a FineTuneJob document (defaults else)."""
    spec = doc.get("spec") if doc.get("kind") else None
    res = (spec or {}).get("resources") or {}
    return Placement(
        gpus=int(res.get("gpus", 1)),
        nodes=int(res.get("nodes", 1)),
        gpu_type=res.get("gpuType"),
        memory=str(res["memory"]) if res.get("memory") is not None else None,
    )


def target_for(
    placement: Placement,
    gpu_memory: int | None,
    gpu: GpuType | None,
    price: float | None,
) -> tuple[Target, list[str]]:
    """The target the plan is made for, and notes on what was assumed."""
    notes = []
    if placement.gpus == 0 and (gpu is not None or gpu_memory is not None):
        placement = replace(placement, gpus=1)
        notes.append("resources.gpus is 0: planned on one GPU of the type or memory given")
    if placement.gpus == 0:
        memory = parse_memory(placement.memory) if placement.memory else gpu_memory
        return Target(0, placement.nodes, memory, None, price), notes
    if gpu is None and placement.gpu_type:
        from finetune_trainer.planning.gpus import gpu_type

        gpu = gpu_type(placement.gpu_type)
        if gpu is None:
            notes.append(f"resources.gpuType {placement.gpu_type!r} is not a GPU type known here")
    if gpu is None and gpu_memory is None:
        gpu = DEFAULT_GPU
        notes.append("no GPU type or memory given: planned for an NVIDIA H100 80GB")
    memory = gpu_memory if gpu_memory is not None else (gpu.memory if gpu else None)
    if gpu is None:
        notes.append("GPU type unknown: no duration (give --gpu-type for one)")
    return Target(placement.gpus, placement.nodes, memory, gpu, price), notes


def dataset_is_here(run: RunConfig) -> bool:
    """Whether the training data can be read on this machine (inline, or a local file)."""
    d = run.dataset
    if d.inline is not None:
        return True
    if d.source is None or not storage.is_local(d.source):
        return False
    try:
        return Path(storage.resolve(d.source)).exists()
    except storage.StorageError:
        return False


# Without the tokenizer (a hub model's is not fetched): characters per token of English text
# in the usual BPE vocabularies, and the tokens a prompt template adds per example.
CHARS_PER_TOKEN = 4
TEMPLATE_TOKENS = 16


def _chars(record: Any) -> int:
    """Characters of text in a record (its strings, nested ones included)."""
    if isinstance(record, str):
        return len(record)
    if isinstance(record, dict):
        return sum(_chars(v) for v in record.values())
    if isinstance(record, list):
        return sum(_chars(v) for v in record)
    return 0


def approximate_data(run: RunConfig) -> Data:
    """Token lengths of the training records from their characters (CHARS_PER_TOKEN), for a
    model whose tokenizer is not here; capped at maxSeqLength. Held-out splits included."""
    from finetune_trainer.data import load_records

    seq = run.dataset.max_seq_length
    raw = load_records(run.dataset)
    return data_of([min(seq, _chars(r) // CHARS_PER_TOKEN + TEMPLATE_TOKENS) for r in raw.records])


def count_data(run: RunConfig, cache_dir: Path) -> tuple[Data | None, int, str | None]:
    """The training split's token lengths: exact (the validator's, with the model's
    tokenizer) for a local model, approximate from characters for a hub or remote model (its
    tokenizer is not fetched); and the number of labels. None and why when the data is not
    readable here."""
    from finetune_trainer.models import fetch_model
    from finetune_trainer.runner import prepare_data

    if not dataset_is_here(run):
        return None, 2, f"dataset not counted: {run.dataset.source} is not readable here"
    if not storage.is_local(run.model.source):
        data = approximate_data(run)
        return (
            data,
            2,
            (
                f"dataset approximated ({data.examples:,} examples, ~{CHARS_PER_TOKEN} characters "
                "per token): the tokenizer of a hub or remote model is not fetched"
            ),
        )
    _, prepared = prepare_data(run, fetch_model(run.model, cache_dir))
    return (
        data_of(sequence_lengths(run, prepared.train)),
        len(prepared.label_names or ()) or 2,
        None,
    )


def _pair(values: tuple[float, float] | None) -> list[float] | None:
    """A (low, high) range to 4 significant digits."""
    return [float(f"{v:.4g}") for v in values] if values else None


def _option(option: Option | None) -> dict[str, Any] | None:
    if option is None:
        return None
    return {
        "method": option.method,
        "gpus": option.gpus,
        "strategy": option.strategy,
        "gradientCheckpointing": option.gradient_checkpointing,
        "batchSize": option.batch_size,
        "peakGiBPerGpu": round(option.peak_bytes / GIB, 2),
        "expectedSeconds": _pair(option.seconds),
        "text": option.describe(),
    }


def as_dict(
    name: str,
    run: RunConfig,
    facts: ModelFacts,
    target: Target,
    data: Data | None,
    resolved: Resolved,
    time: Timing,
    advice: Advice,
    notes: list[str],
) -> dict[str, Any]:
    """The plan as JSON-ready camelCase data (`--output json`)."""
    shape, params = facts.shape, facts.params
    mem = resolved.memory
    return {
        "name": name,
        "model": {
            "source": run.model.source,
            "layers": shape.layers,
            "hidden": shape.hidden,
            "vocab": shape.vocab,
            "totalParams": params.total,
            "trainableParams": params.trainable,
        },
        "target": {
            "gpus": target.gpus,
            "nodes": target.nodes,
            "worldSize": target.world_size,
            "gpuType": target.gpu.name if target.gpu else None,
            "gpuMemoryGiB": round(target.memory / GIB, 2) if target.memory else None,
        },
        "run": {
            "method": run.method.type,
            "precision": precision(run, target),
            "batchSize": resolved.batch_size,
            "batchSizeFrom": "spec" if run.training.batch_size != "auto" else "estimate",
            "gradientCheckpointing": resolved.gradient_checkpointing,
            "maxSeqLength": run.dataset.max_seq_length,
            "strategy": resolved.strategy.kind,
        },
        "memory": {
            "worstCaseTokens": mem.tokens,
            "rows": mem.rows,
            "breakdownGiB": describe_parts(mem),
            "allocatedGiB": round(mem.allocated / GIB, 2),
            "peakGiBPerGpu": round(mem.total / GIB, 2),
            "fits": resolved.fits,
        },
        "data": {"examples": data.examples, "tokens": data.tokens} if data else None,
        "time": {
            "steps": time.steps,
            "epochs": round(time.epochs, 3) if time.epochs is not None else None,
            "trainedTokens": time.trained_tokens,
            "expectedSeconds": _pair(time.seconds),
            "gpuHours": _pair(time.gpu_hours),
            "cost": _pair(time.cost),
            "assumption": f"model FLOPs at {MFU_RANGE[0]:.0%}-{MFU_RANGE[1]:.0%} MFU "
            "(the trainer's measured range); an estimate",
        },
        "advice": {
            "options": [_option(o) for o in advice.options],
            "smallest": _option(advice.smallest),
            "fastest": _option(advice.fastest),
            "notes": advice.notes,
        },
        "notes": notes,
    }


def build(
    name: str,
    run: RunConfig,
    placement: Placement,
    *,
    gpu_memory: int | None = None,
    gpu: GpuType | None = None,
    price: float | None = None,
    cache_dir: Path,
) -> dict[str, Any]:
    """Plan `run`: read the model's config (no weights) and count the data when it is here."""
    from finetune_trainer.planning.facts import method_facts
    from finetune_trainer.planning.source import load_config

    target, notes = target_for(placement, gpu_memory, gpu, price)
    data, labels, why = count_data(run, cache_dir)
    if why:
        notes.append(why)
    config = load_config(run.model, cache_dir)
    methods = method_facts(config, run, num_labels=labels)
    facts = methods[run.method.type]
    resolved = resolve(run, facts, target, data)
    time = timing(run, facts, target, data, resolved.batch_size)
    advice = advise(run, methods, target, data)
    return as_dict(name, run, facts, target, data, resolved, time, advice, notes)


def _duration(seconds: float) -> str:
    """`45 s`, `12 min`, `3.4 h`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.3g} h"


def tables(plan: dict[str, Any]) -> list[Table]:
    """The plan as tables: summary, memory breakdown, advice."""
    run, mem, time, target = plan["run"], plan["memory"], plan["time"], plan["target"]
    model = plan["model"]
    gpu = target["gpuType"] or ("GPU" if target["gpus"] else "CPU worker")
    fits = {True: "[green]fits[/green]", False: "[red]does not fit[/red]", None: "unknown"}
    summary = Table(title=f"finetune plan: {plan['name']} (an estimate)", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()

    def span(pair: list[float] | None, fmt: str) -> str | None:
        return f"{fmt.format(pair[0])} - {fmt.format(pair[1])}" if pair else None

    seconds = time["expectedSeconds"]
    rows = (
        ("model", f"{model['source']} ({model['totalParams']:,} parameters)"),
        ("trainable", f"{model['trainableParams']:,} ({run['method']})"),
        (
            "target",
            f"{target['worldSize']} x {gpu}"
            + (f" ({target['gpuMemoryGiB']} GiB)" if target["gpuMemoryGiB"] else ""),
        ),
        (
            "setup",
            f"batch {run['batchSize']} ({run['batchSizeFrom']}), maxSeqLength "
            f"{run['maxSeqLength']}, {run['precision']}, checkpointing "
            f"{'on' if run['gradientCheckpointing'] else 'off'}, {run['strategy']}",
        ),
        ("peak per GPU", f"{mem['peakGiBPerGpu']} GiB: {fits[mem['fits']]}"),
        ("worst-case batch", f"{mem['worstCaseTokens']:,} tokens in {mem['rows']} row(s)"),
        (
            "data",
            f"{plan['data']['examples']:,} examples, {plan['data']['tokens']:,} tokens"
            if plan["data"]
            else None,
        ),
        ("steps", f"{time['steps']:,}" if time["steps"] else None),
        ("trained tokens", f"{time['trainedTokens']:,}" if time["trainedTokens"] else None),
        ("duration", f"{_duration(seconds[0])} - {_duration(seconds[1])}" if seconds else None),
        ("GPU-hours", span(time["gpuHours"], "{:.3g}")),
        ("cost", span(time["cost"], "{:.3g}")),
    )
    for key, value in rows:
        if value is not None:
            summary.add_row(key, value)
    breakdown = Table(title="memory per GPU (GiB)")
    breakdown.add_column("part")
    breakdown.add_column("GiB", justify="right")
    for part, gib in mem["breakdownGiB"].items():
        breakdown.add_row(part, f"{gib:.2f}")
    breakdown.add_row("[bold]total[/bold]", f"[bold]{mem['peakGiBPerGpu']:.2f}[/bold]")
    advice = Table(title=f"advice (fewest {gpu}s that fit, per method)", show_header=False)
    advice.add_column()
    adv = plan["advice"]
    for option in adv["options"]:
        advice.add_row(Text(option["text"]))
    for key, label in (("smallest", "smallest"), ("fastest", "fastest of these")):
        if adv[key]:
            advice.add_row(Text(f"{label}: {adv[key]['text']}"))
    for note in adv["notes"] + plan["notes"]:
        advice.add_row(Text(f"note: {note}", style="dim"))
    return [summary, breakdown, advice]
