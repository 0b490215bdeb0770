"""`finetune`: run a FineTuneJob locally, validate one, and (with the operator extra) talk to
a cluster. Cluster commands are plugged in through the `finetune.cli` entry-point group."""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from finetune_trainer.config import ConfigError, RunConfig
from finetune_trainer.manifest import load_run
from finetune_trainer.progress import ENV_PVC_ROOT, ExitCode, Outcome, Phase, Summary
from finetune_trainer.progress import Progress as RunProgress

console = Console(stderr=True)
app = typer.Typer(
    name="finetune",
    help="Fine-tune LLMs from a FineTuneJob manifest: locally (run, validate) or on Kubernetes.",
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


def _quiet_libraries() -> None:
    """Keep library warnings and their own progress bars out of the progress display."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load(file: Path, overrides: list[str] | None) -> tuple[str, RunConfig]:
    try:
        name, run, ignored = load_run(file, overrides)
    except ConfigError as exc:
        console.print(f"[red]invalid {file}:[/red]")
        for line in exc.errors:
            console.print(f"  {line}", markup=False, highlight=False)
        raise typer.Exit(int(ExitCode.INVALID_INPUT)) from None
    if ignored:
        console.print(f"[dim]cluster-only fields not used locally: {', '.join(ignored)}[/dim]")
    return name, run


def _local_output(name: str, run: RunConfig, output: Path | None) -> RunConfig:
    uri = str(output) if output else None
    if uri is None and run.output.uri.startswith("pvc://") and ENV_PVC_ROOT not in os.environ:
        uri = f"outputs/{name}"
        console.print(f"[dim]output {run.output.uri} is a cluster volume; writing to ./{uri}[/dim]")
    if uri is None:
        return run
    return run.model_copy(update={"output": run.output.model_copy(update={"uri": uri})})


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
    table.add_column()
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
        ("message", summary.message),
    ):
        if value is not None:
            table.add_row(key, Text(str(value)))
    return table


@app.command()
def run(
    file: FileArg,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write outputs here (overrides output.uri)."),
    ] = None,
    set_: SetOpt = None,
    progress_port: Annotated[
        int, typer.Option(help="Also serve GET /progress on this port (0: off).")
    ] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show library logs.")] = False,
) -> None:
    """Fine-tune locally, in this process, with a progress bar and a final summary.

    Resumes automatically from the newest complete checkpoint in the output location.
    Exit codes: 0 succeeded, 65 invalid input, 75 interrupted (running again resumes), 1 failed.
    """
    from finetune_trainer.reporting import exit_code, run_reported
    from finetune_trainer.runner import RunContext

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        _quiet_libraries()
    name, run_config = _load(file, set_)
    run_config = _local_output(name, run_config, output)
    ctx = RunContext(name=name)
    bar = _Bar()
    ctx.tracker.subscribe(bar)
    with bar.progress:
        summary = run_reported(run_config, ctx, progress_port=progress_port or None)
    console.print(_summary_table(summary))
    if summary.outcome == Outcome.SUCCEEDED:
        console.print(f"outputs in [bold]{run_config.output.uri}[/bold]")
    raise typer.Exit(int(exit_code(summary)))


@app.command()
def validate(file: FileArg, set_: SetOpt = None) -> None:
    """Check the spec and the dataset without loading the model. Exit 65 when invalid.

    Checks the dataset's format, fields, duplicates and lengths.
    Only the tokenizer is loaded, to measure lengths in tokens."""
    from finetune_trainer.models import ModelLoadError, fetch_model
    from finetune_trainer.runner import (
        InvalidInputError,
        data_summary,
        generation_eval,
        prepare_data,
    )

    name, run_config = _load(file, set_)
    console.print(f"[green]spec OK[/green]: {name} ({run_config.method.type}, {run_config.task})")
    try:
        with console.status("checking the dataset"):
            local = fetch_model(run_config.model, Path.cwd() / ".finetune-cache")
            tokenizer, prepared = prepare_data(run_config, local)
            generation = generation_eval(run_config, prepared, tokenizer)
    except (InvalidInputError, ModelLoadError) as exc:
        console.print("[red]invalid:[/red]")
        console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(int(ExitCode.INVALID_INPUT)) from None
    console.print(prepared.report.render(), markup=False, highlight=False)
    console.print("\n".join(prepared.stats.render_lines()), markup=False, highlight=False)
    console.print("[green]dataset OK[/green]: ", end="")
    console.print(data_summary(prepared), markup=False, highlight=False)
    if generation is not None:
        console.print(
            f"[green]generation eval OK[/green]: {len(generation.held.prompts)} held-out prompts"
        )


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
