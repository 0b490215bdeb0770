"""`finetune status|list|logs|cancel`: thin cluster helpers (each has a kubectl equivalent).

Loaded by the `finetune` console script through the entry point group `finetune.cli`
(`cluster = "finetune_operator.cli:register"`). Credentials: KUBECONFIG / ~/.kube/config, or
the pod's service account.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from kubernetes_asyncio.config import ConfigException
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from finetune_operator.api import FineTuneJobStatus
from finetune_operator.builders import CONTAINER_NAME
from finetune_operator.kube import ApiException, Kube, api_message, connect, default_namespace
from finetune_operator.status import TERMINAL_PHASES, parse_status

T = TypeVar("T")
console = Console()
SPARKS = "▁▂▃▄▅▆▇█"

Namespace = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace (default: kubeconfig's).")
]


def sparkline(values: list[float], width: int = 40) -> str:
    """A unicode sparkline of the last `width` values."""
    values = values[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(7, int((v - low) / span * 7.999))] for v in values)


def _run(fn: Callable[[Kube, str], Awaitable[T]], namespace: str | None) -> T:
    async def main() -> T:
        kube = await connect()
        try:
            return await fn(kube, namespace or default_namespace())
        finally:
            await kube.close()

    try:
        return asyncio.run(main())
    except ApiException as exc:
        console.print(f"[red]error:[/] {api_message(exc)}")
        raise typer.Exit(1) from None
    except ConfigException as exc:
        console.print(f"[red]error:[/] no usable Kubernetes credentials: {exc}")
        raise typer.Exit(1) from None


async def _finetunejob(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    """The FineTuneJob, or exit 1 saying it is not there."""
    obj = await kube.get_finetunejob(namespace, name)
    if obj is None:
        console.print(f"[red]finetunejob {name} not found in namespace {namespace}[/]")
        raise typer.Exit(1)
    return obj


def _age(stamp: str | None) -> str:
    if not stamp:
        return ""
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return ""
    seconds = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def render_status(name: str, status: FineTuneJobStatus, losses: list[float]) -> Group:
    """A FineTuneJob's status for humans: phase, progress bar, loss sparkline, checkpoints."""
    parts: list[Any] = [Text.from_markup(f"[bold]{name}[/]  phase: [cyan]{status.phase or '-'}[/]")]
    progress = status.progress
    if progress is not None:
        percent = progress.percent or 0.0
        parts.append(ProgressBar(total=100.0, completed=percent, width=50))
        parts.append(
            Text(
                f"step {progress.step or 0}/{progress.total_steps or '?'}  {percent:.1f}%  "
                f"loss {progress.loss if progress.loss is not None else '-'}  "
                f"eval {progress.eval_loss if progress.eval_loss is not None else '-'}  "
                f"ETA {progress.eta or '-'}  stage {progress.stage or '-'}"
            )
        )
    if losses:
        parts.append(Text(f"loss {sparkline(losses)}  ({losses[0]:.4g} -> {losses[-1]:.4g})"))
    if status.conditions:
        table = Table("condition", "status", "reason", "message", box=None)
        for c in status.conditions:
            table.add_row(c.type, c.status, c.reason, c.message[:120])
        parts.append(table)
    if status.checkpoints:
        table = Table("step", "checkpoint", "eval loss", "best", box=None)
        for ck in status.checkpoints[-5:]:
            table.add_row(
                str(ck.step),
                ck.uri,
                "" if ck.eval_loss is None else f"{ck.eval_loss:.4g}",
                "*" if ck.best else "",
            )
        parts.append(table)
    if status.result is not None:
        result = status.result
        if result.model_uri:
            parts.append(Text(f"model: {result.model_uri}"))
        else:
            parts.append(Text(f"adapter: {result.adapter_uri or '-'}"))
        if result.merged_model_uri:
            parts.append(Text(f"merged: {result.merged_model_uri}"))
        if result.metrics:
            parts.append(
                Text("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
            )
    for tracker in status.tracking or []:
        where = tracker.url or tracker.location or "-"
        failed = f"  (stopped: {tracker.error})" if tracker.error else ""
        parts.append(Text(f"{tracker.name}: {where}{failed}"))
    return Group(*parts)


def status_cmd(
    name: Annotated[str, typer.Argument(help="FineTuneJob name.")],
    namespace: Namespace = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow until it finishes.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with -w.")] = 2.0,
) -> None:
    """Show a FineTuneJob's phase, progress, loss, checkpoints and result."""

    async def fetch(kube: Kube, ns: str) -> FineTuneJobStatus:
        obj = await _finetunejob(kube, ns, name)
        return parse_status(obj.get("status"))

    losses: list[float] = []

    def record(status: FineTuneJobStatus) -> None:
        loss = status.progress.loss if status.progress else None
        if loss is not None and (not losses or losses[-1] != loss):
            losses.append(loss)

    status = _run(fetch, namespace)
    record(status)
    if not watch:
        console.print(render_status(name, status, losses))
        raise typer.Exit(1 if status.phase == "Failed" else 0)
    with Live(render_status(name, status, losses), console=console, refresh_per_second=4) as live:
        while status.phase not in TERMINAL_PHASES:
            time.sleep(interval)
            status = _run(fetch, namespace)
            record(status)
            live.update(render_status(name, status, losses))
    raise typer.Exit(1 if status.phase == "Failed" else 0)


def list_cmd(
    namespace: Namespace = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="List in every namespace.")
    ] = False,
) -> None:
    """List FineTuneJobs with phase, progress, loss and ETA."""

    async def fetch(kube: Kube, ns: str) -> list[dict[str, Any]]:
        return await kube.list_finetunejobs(None if all_namespaces else ns)

    items = _run(fetch, namespace)
    table = Table("NAMESPACE", "NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "AGE")
    for item in items:
        meta = item.get("metadata", {})
        status = parse_status(item.get("status"))
        progress = status.progress
        table.add_row(
            meta.get("namespace", ""),
            meta.get("name", ""),
            status.phase or "",
            f"{progress.percent:.0f}%" if progress and progress.percent is not None else "",
            f"{progress.loss:.4g}" if progress and progress.loss is not None else "",
            progress.eta or "" if progress else "",
            _age(meta.get("creationTimestamp")),
        )
    console.print(table)


def logs_cmd(
    name: Annotated[str, typer.Argument(help="FineTuneJob name.")],
    namespace: Namespace = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines.")] = False,
) -> None:
    """Print the trainer's log (the latest attempt's pod)."""

    async def fetch(kube: Kube, ns: str) -> None:
        obj = await _finetunejob(kube, ns, name)
        pod = parse_status(obj.get("status")).pod_name
        if pod is None:
            pods = await kube.job_pods(ns, name)
            pod = pods[-1]["metadata"]["name"] if pods else None
        if pod is None:
            console.print(f"{name} has no trainer pod yet")
            raise typer.Exit(1)
        if follow:
            async for line in kube.follow_pod_log(ns, pod, CONTAINER_NAME):
                print(line, flush=True)
        else:
            print(await kube.pod_log(ns, pod, CONTAINER_NAME), end="")

    _run(fetch, namespace)


def cancel_cmd(
    name: Annotated[str, typer.Argument(help="FineTuneJob name.")],
    namespace: Namespace = None,
) -> None:
    """Cancel a FineTuneJob: delete it (its Job, pods and ConfigMap are garbage-collected).

    Checkpoints and outputs already written to the output URI are kept.
    """

    async def delete(kube: Kube, ns: str) -> bool:
        return await kube.delete_finetunejob(ns, name)

    if _run(delete, namespace):
        console.print(f"finetunejob {name} cancelled (deleted)")
    else:
        console.print(f"[red]finetunejob {name} not found[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the cluster commands to the `finetune` CLI."""
    app.command("status")(status_cmd)
    app.command("list")(list_cmd)
    app.command("logs")(logs_cmd)
    app.command("cancel")(cancel_cmd)
