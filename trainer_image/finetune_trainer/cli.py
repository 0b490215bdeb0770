"""`finetune`: run a FineTuneJob locally, validate one, and (with the operator extra) talk to
a cluster. Cluster commands are plugged in through the `finetune.cli` entry-point group."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from finetune_trainer.config import ConfigError, RunConfig
from finetune_trainer.errors import InvalidInputError, TransientError, classify
from finetune_trainer.manifest import load_run
from finetune_trainer.progress import ENV_PVC_ROOT, ExitCode, Outcome, Phase, Summary
from finetune_trainer.progress import Progress as RunProgress

EXIT_CODES = (
    "Exit codes: 0 succeeded; 65 invalid input (the spec, the spec file's contents, the data, "
    "the model source, an output that cannot be written, holds another run or is in use: one "
    "line names what to fix); 75 interrupted (run again to resume from the last checkpoint, or "
    "to start over when training had not started); 2 wrong command line "
    "(unknown option, FILE missing, a directory or unreadable); 1 failed (retryable, e.g. a "
    "network or server outage; a traceback means a bug)."
)
OUTPUT_ROOT = Path("outputs")

console = Console(stderr=True)
app = typer.Typer(
    name="finetune",
    help="Fine-tune LLMs from a FineTuneJob manifest: locally (run, validate) or on Kubernetes.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

FileArg = Annotated[
    Path,
    typer.Argument(
        exists=True, dir_okay=False, help="FineTuneJob manifest or bare run config (YAML/JSON)."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a run field: key.path=value (YAML value), e.g. --set training.maxSteps=10. "
        "Repeatable.",
    ),
]
DebugOpt = Annotated[
    bool,
    typer.Option(
        "--debug", help="Show debug logs and the traceback of every error (user errors too)."
    ),
]


@contextmanager
def reported(debug: bool) -> Iterator[None]:
    """Turn a user error (exit 65) or a transient failure (exit 1) raised inside into one line;
    anything else is a bug and keeps its traceback. With `debug`, tracebacks are always shown."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        found = exc if isinstance(exc, ConfigError) else classify(exc, "")
        if found is None:
            raise
        if debug:
            console.print(traceback.format_exc(), markup=False, highlight=False)
        lines = found.errors if isinstance(found, ConfigError) else [str(found)]
        transient = isinstance(found, TransientError)
        console.print("[red]failed (transient):[/red]" if transient else "[red]invalid:[/red]")
        for line in lines:
            _plain(f"  {line}")
        code = ExitCode.FAILED if transient else ExitCode.INVALID_INPUT
        raise typer.Exit(int(code)) from None


def _logging(verbose: bool, debug: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose or debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if debug:
        logging.getLogger("finetune_trainer").setLevel(logging.DEBUG)
    else:  # which model is loaded, and a classifier's new head
        logging.getLogger("finetune_trainer.models").setLevel(logging.INFO)


def _quiet_libraries() -> None:
    """Keep library warnings and their own progress bars out of the progress display."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _plain(text: str) -> None:
    """Print text that may hold user data and long paths: no markup, no wrapping."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _load(file: Path, overrides: list[str] | None) -> tuple[str, RunConfig]:
    try:
        name, run, placement = load_run(file, overrides)
    except ConfigError as exc:
        console.print(f"[red]invalid {file}:[/red]", highlight=False, soft_wrap=True)
        for line in exc.errors:
            _plain(f"  {line}")
        raise typer.Exit(int(ExitCode.INVALID_INPUT)) from None
    if placement:
        console.print(f"[dim]checked, used on a cluster only: {', '.join(placement)}[/dim]")
    return name, run


def output_dir_for(name: str, root: Path = OUTPUT_ROOT) -> Path:
    """Where a local run of FineTuneJob `name` writes when its output is a cluster volume:
    `root`/`name`, never outside `root` (ConfigError for a name that would leave it)."""
    target = root / name
    inside = target.resolve().parent == root.resolve() and target.name == name
    if not name or not inside:
        raise ConfigError([f"metadata.name: {name!r} cannot name a directory under {root}/"])
    return target


def _writable(path: Path, option: str) -> None:
    """Create `path` and check that files can be written there, or raise InvalidInputError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        found = classify(exc, f"{option} {path}")
        if found is None:
            raise
        raise found from exc


def _local_output(name: str, run: RunConfig, output: Path | None) -> RunConfig:
    if output is not None:
        _writable(output, "--output")
        uri = str(output)
    elif run.output.uri.startswith("pvc://") and ENV_PVC_ROOT not in os.environ:
        target = output_dir_for(name)
        _writable(target, "output.uri: writing locally to")
        uri = str(target)
        console.print(f"[dim]output {run.output.uri} is a cluster volume; writing to ./{uri}[/dim]")
    else:
        from finetune_trainer import storage

        if storage.is_local(run.output.uri):
            _writable(Path(storage.resolve(run.output.uri)), "output.uri")
        return run
    return run.model_copy(update={"output": run.output.model_copy(update={"uri": uri})})


def _worker_logs(name: str, run: RunConfig) -> Path:
    """Where `finetune run --nproc-per-node` puts its workers' logs: logs/ in a local output,
    else in the staging directory of a remote one."""
    from finetune_trainer import storage

    if storage.is_local(run.output.uri):
        return Path(storage.resolve(run.output.uri)) / "logs"
    return Path(tempfile.gettempdir()) / "finetune-run" / name / "logs"


def _free_port(port: int) -> int:
    """Typer callback: `port` if this machine can serve on it (0: off)."""
    if port:
        try:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("0.0.0.0", port))
        except OSError as exc:
            raise typer.BadParameter(f"cannot serve on port {port}: {exc.strerror}") from None
    return port


class _Bar:
    """A rich progress bar fed by the run's tracker."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]:<15}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("eval {task.fields[eval]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("run", total=None, phase="starting", loss="-", eval="-")
        self._last_message: str | None = None

    def __call__(self, p: RunProgress) -> None:
        fields: dict[str, Any] = {"phase": p.phase.value}
        if p.loss is not None:
            fields["loss"] = f"{p.loss:.4f}"
        if p.eval_loss is not None:
            fields["eval"] = f"{p.eval_loss:.4f}"
        if p.total_steps:
            fields["total"] = p.total_steps
        if p.phase == Phase.TRAINING or p.step:
            fields["completed"] = p.step
        self.progress.update(self.task, **fields)
        if p.message and p.phase not in (Phase.TRAINING,) and p.message != self._last_message:
            self._last_message = p.message
            self.progress.console.print(Text(f"{p.phase.value}: {p.message}", style="dim"))


def _summary_table(summary: Summary) -> Table:
    table = Table(title=f"finetune: {summary.outcome.value}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # URIs and run links whole, wrapped
    for key, value in (
        ("adapter", summary.adapter_uri),
        ("model", summary.model_uri),
        ("merged model", summary.merged_model_uri),
        ("steps", summary.steps),
        ("trained tokens", f"{summary.trained_tokens:,}" if summary.trained_tokens else None),
        (
            "trainable params",
            f"{summary.trainable_params:,} of {summary.total_params:,}"
            if summary.trainable_params and summary.total_params
            else None,
        ),
        ("last checkpoint", summary.last_checkpoint.uri if summary.last_checkpoint else None),
        *((k, f"{v:.4f}") for k, v in summary.metrics.items()),
        *(
            (t.name, (t.url or t.location or "-") + (f" (stopped: {t.error})" if t.error else ""))
            for t in summary.trackers or []
        ),
        ("message", summary.message),
    ):
        if value is not None:
            table.add_row(key, Text(str(value)))
    return table


@app.command(epilog=EXIT_CODES)
def run(
    file: FileArg,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write outputs here (overrides output.uri)."),
    ] = None,
    set_: SetOpt = None,
    progress_port: Annotated[
        int,
        typer.Option(help="Also serve GET /progress on this port (0: off).", callback=_free_port),
    ] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show library logs.")] = False,
    debug: DebugOpt = False,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            "--nproc-per-node",
            min=1,
            max=64,
            help="Train with N worker processes here (one per GPU; on CPU, gloo processes), as "
            "torchrun would: training.distributed applies; workers' logs go to OUTPUT/logs/.",
        ),
    ] = 1,
) -> None:
    """Fine-tune locally, with a progress bar and a final summary.

    A FineTuneJob manifest is checked as the cluster would admit it. Resumes automatically
    from the newest complete checkpoint in the output location. One process by default; with
    --nproc-per-node N, N workers under PyTorch's launcher (DDP or FSDP).
    """
    _logging(verbose, debug)
    with reported(debug):
        name, run_config = _load(file, set_)  # before the heavy imports: errors come at once
        run_config = _local_output(name, run_config, output)
        if not verbose and not debug:
            _quiet_libraries()
        from finetune_trainer.models import kbit_device_error
        from finetune_trainer.reporting import exit_code, run_reported
        from finetune_trainer.runner import RunContext

        problem = kbit_device_error(run_config)
        if problem:
            raise InvalidInputError(problem)
    bar = _Bar()
    if nproc_per_node > 1:
        from finetune_trainer.local_group import run_group

        logs = _worker_logs(name, run_config)
        with bar.progress:
            summary = run_group(name, run_config, nproc_per_node, logs, bar, progress_port)
        console.print(f"[dim]workers' logs in {logs}[/dim]")
    else:
        ctx = RunContext(name=name)
        ctx.tracker.subscribe(bar)
        with bar.progress:
            summary = run_reported(run_config, ctx, progress_port=progress_port or None)
    console.print(_summary_table(summary))
    if summary.outcome == Outcome.SUCCEEDED:
        console.print(f"outputs in [bold]{run_config.output.uri}[/bold]")
    raise typer.Exit(int(exit_code(summary)))


@app.command(epilog=EXIT_CODES)
def validate(file: FileArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Check a FineTuneJob as the cluster would admit it, and its dataset, without loading
    the model.

    Checks the spec (the operator's rules and the platform policy's defaults), the dataset's
    format, fields, duplicates and lengths (only the tokenizer is loaded, to count tokens) and
    the prompts of a generation eval. Exit 65 when anything is invalid.
    """
    _logging(False, debug)
    with reported(debug):
        name, run_config = _load(file, set_)
        console.print(
            f"[green]spec OK[/green]: {name} ({run_config.method.type}, {run_config.task}"
            + (f", {run_config.training.objective}" if run_config.preference else "")
            + ")"
        )
        from finetune_trainer.models import fetch_model
        from finetune_trainer.runner import data_summary, generation_eval, prepare_data

        with console.status("checking the dataset"):
            local = fetch_model(run_config.model, Path.cwd() / ".finetune-cache")
            tokenizer, prepared = prepare_data(run_config, local)
            generation = generation_eval(run_config, prepared, tokenizer)
    _plain(prepared.report.render())
    _plain("\n".join(prepared.stats.render_lines()))
    console.print("[green]dataset OK[/green]: ", end="")
    _plain(data_summary(prepared))
    if generation is not None:
        console.print(
            f"[green]generation eval OK[/green]: {len(generation.held.prompts)} held-out prompts"
        )


def _gpu_memory_option(value: str | None) -> int | None:
    """Typer callback: --gpu-memory as bytes."""
    if value is None:
        return None
    from finetune_trainer.planning.gpus import parse_memory

    try:
        return parse_memory(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _gpu_type_option(value: str | None) -> Any:
    """Typer callback: --gpu-type as a known GPU type."""
    if value is None:
        return None
    from finetune_trainer.planning.gpus import GPU_TYPES, gpu_type

    found = gpu_type(value)
    if found is None:
        known = ", ".join(g.name for g in GPU_TYPES)
        raise typer.BadParameter(f"{value!r} is not a known GPU type ({known}); or --gpu-memory")
    return found


@app.command(epilog=EXIT_CODES)
def plan(
    file: FileArg,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            "--gpu-memory",
            help="Memory of each GPU (80Gi, 24GB); default: from --gpu-type or resources.gpuType.",
        ),
    ] = None,
    gpu_type: Annotated[
        str | None,
        typer.Option("--gpu-type", help="GPU type (H100, H200, A100, A100-40GB, L40S, L4, ...)."),
    ] = None,
    price: Annotated[
        float | None,
        typer.Option("--price-per-gpu-hour", min=0.0, help="Price of one GPU-hour, for a cost."),
    ] = None,
    output: Annotated[
        str, typer.Option("--output", "-o", help="table or json.", case_sensitive=False)
    ] = "table",
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Estimate per-GPU memory, fit, duration and cost of a run, and advise what fits.

    Reads only the model's config (config.json; a .gguf file's header; from the Hub only
    config.json) and never loads weights. A dataset on this machine is counted: exactly with a
    local model's tokenizer, approximately (from characters) for a hub model. Everything is an
    estimate: the worst case for memory, a range for time. See docs/planning.md.
    """
    import json

    if output not in ("table", "json"):
        raise typer.BadParameter("--output: table or json")
    memory = _gpu_memory_option(gpu_memory)
    gpu = _gpu_type_option(gpu_type)
    _logging(False, debug)
    with reported(debug):
        name, run_config = _load(file, set_)
        _quiet_libraries()
        from finetune_trainer.manifest import read_document
        from finetune_trainer.planning.report import build, placement_of

        placement = placement_of(read_document(file))
        with console.status("planning"):
            result = build(
                name,
                run_config,
                placement,
                gpu_memory=memory,
                gpu=gpu,
                price=price,
                cache_dir=Path.cwd() / ".finetune-cache",
            )
    if output == "json":
        print(json.dumps(result, indent=1))
        return
    from finetune_trainer.planning.report import tables

    out = Console()
    for table in tables(result):
        out.print(table)


def _load_plugins() -> None:
    for ep in entry_points(group="finetune.cli"):
        try:
            register = ep.load()
        except ImportError as exc:  # the operator extra is not installed
            logging.getLogger(__name__).debug(
                "finetune.cli plugin %s unavailable: %s", ep.name, exc
            )
            continue
        register(app)


def main() -> None:
    """Console-script entry point."""
    _load_plugins()
    app(prog_name="finetune")


if __name__ == "__main__":
    main()
    sys.exit(0)
