"""Experiment trackers: MLflow, Weights & Biases, TensorBoard (`spec.tracking`).

transformers' own integration callbacks (`MLflowCallback`, `WandbCallback`,
`TensorBoardCallback`) log the Trainer's arguments and every logged step (loss, learning rate,
evaluations). This module opens the tracker run they log into (experiment, name, tags, the
FineTuneJob's namespace/name/uid), adds what they do not log (the resolved hyperparameters, the
dataset report, the final and baseline metrics, generation samples, where the weights are) and
closes it. Rank 0 alone reports.

A tracker that fails once training is under way (server down, credentials refused) is dropped
with a warning and the training goes on; the failure is reported in `Progress.trackers` and
`Summary.trackers`. What can be known wrong before training (a client not installed, W&B
online without an API key) is the user's to fix: `preflight` raises InvalidInputError.
"""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_trainer import output_files
from finetune_trainer.config import MlflowSpec, RunConfig, TrackingSpec, WandbSpec
from finetune_trainer.errors import InvalidInputError, first_line
from finetune_trainer.progress import (
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_JOB_UID,
    ENV_WANDB_API_KEY,
    Outcome,
    TrackerInfo,
)

log = logging.getLogger(__name__)

IDS_FILE = "tracking.json"  # tracker run ids: a resumed run reports into the same runs
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
TAG_PREFIX = "finetune.dev/"
# A tracker that does not answer must not hold training up for minutes (MLflow's defaults
# retry 7 times with exponential backoff and wait 120 s per request); the user's own settings win.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
MAX_LOG_PARAMS = "MLFLOW_MAX_LOG_PARAMS"  # read by transformers' MLflowCallback
CLIENTS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}
_EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_substep_end",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
    "on_push_begin",
)


@dataclass(frozen=True)
class JobIdentity:
    """The FineTuneJob a run belongs to (FINETUNE_JOB_* variables set by the operator)."""

    name: str
    namespace: str | None = None
    uid: str | None = None

    @classmethod
    def from_env(cls, default_name: str) -> JobIdentity:
        """Name, namespace and uid from the environment (`default_name` for a local run)."""
        return cls(
            name=os.environ.get(ENV_JOB_NAME) or default_name,
            namespace=os.environ.get(ENV_JOB_NAMESPACE) or None,
            uid=os.environ.get(ENV_JOB_UID) or None,
        )

    def tags(self) -> dict[str, str]:
        """`finetune.dev/name`, `/namespace` and `/uid` (those that are known)."""
        values = {"name": self.name, "namespace": self.namespace, "uid": self.uid}
        return {f"{TAG_PREFIX}{k}": v for k, v in values.items() if v}


@dataclass
class Opening:
    """What a tracker records when its run opens."""

    run_name: str
    identity: JobIdentity
    hyperparameters: dict[str, Any]
    dataset: dict[str, Any]
    resume_id: str | None = None


@dataclass
class Closing:
    """What a tracker records when its run closes."""

    outcome: Outcome
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    weights_uri: str | None = None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": leaf}."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


class Tracker:
    """One tracker: transformers' callback for it, and the run that callback logs into."""

    name: str = ""

    def __init__(self, run: RunConfig, out: Path) -> None:
        self.run = run
        self.out = out
        self.run_id: str | None = None
        self.url: str | None = None
        self.location: str | None = None
        self.error: str | None = None
        self.opened = False
        self.logged: set[tuple[str, int]] = set()  # (metric, step) the callback logged
        self._callback: Any = None

    @property
    def callback(self) -> Any:
        """transformers' integration callback (created once)."""
        if self._callback is None:
            self._callback = self.make_callback()
        return self._callback

    def make_callback(self) -> Any:
        raise NotImplementedError

    def open(self, opening: Opening) -> None:
        """Start (or, with `opening.resume_id`, reattach to) the run and record the opening."""
        raise NotImplementedError

    def close(self, closing: Closing) -> None:
        """Record the results and end the run."""
        raise NotImplementedError

    def restore(self) -> None:
        """Undo what `open` changed in the process environment (after the run)."""

    def drop(self) -> None:
        """Let go of the run after a failure (nothing that may wait on the tracker)."""

    def unlogged(self, closing: Closing) -> dict[str, float]:
        """The final metrics the callback did not already log at the final step."""
        return {k: v for k, v in closing.metrics.items() if (k, closing.step) not in self.logged}

    def info(self) -> TrackerInfo:
        """Where the run shows, for progress, summary and status."""
        return TrackerInfo.model_validate(
            {"name": self.name, "url": self.url, "location": self.location, "error": self.error}
        )


class MlflowTracker(Tracker):
    """An MLflow run on a tracking server; MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD from the environment authenticate."""

    name = "mlflow"

    def __init__(self, run: RunConfig, out: Path, spec: MlflowSpec) -> None:
        super().__init__(run, out)
        self.spec = spec
        self._saved_env: dict[str, str | None] = {}

    def make_callback(self) -> Any:
        from transformers.integrations import MLflowCallback

        return MLflowCallback()

    def open(self, opening: Opening) -> None:
        import mlflow

        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            if key not in os.environ:
                self._setenv(key, value)
        mlflow.set_tracking_uri(self.spec.tracking_uri)
        tags = {**(self.spec.tags or {}), **opening.identity.tags()}
        logged: dict[str, str] = {}
        if opening.resume_id and self._exists(opening.resume_id):
            active = mlflow.start_run(run_id=opening.resume_id)
            mlflow.set_tags(tags)
            # An MLflow param never changes; a resumed run may be longer (maxSteps, epochs).
            # The Trainer's arguments were logged by the first attempt: not again.
            logged = dict(active.data.params)
            self._setenv(MAX_LOG_PARAMS, "0")
        else:
            experiment = mlflow.set_experiment(self.spec.experiment)
            active = mlflow.start_run(
                experiment_id=experiment.experiment_id, run_name=opening.run_name, tags=tags
            )
        info = active.info
        self.run_id = info.run_id
        self.url = run_url(self.spec.tracking_uri, info.experiment_id, info.run_id)
        params = {f"finetune.{k}": v for k, v in flatten(opening.hyperparameters).items()}
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != str(v)}
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        if changed:  # what a longer resumed run changed, where a value may change
            mlflow.set_tags({f"{k}.resumed": v for k, v in changed.items()})
        mlflow.log_dict(opening.dataset, "dataset_report.json")

    def close(self, closing: Closing) -> None:
        import mlflow

        metrics = self.unlogged(closing)
        if metrics:
            mlflow.log_metrics(metrics, step=closing.step)
        if closing.samples:
            mlflow.log_table(_columns(closing.samples), "samples.json")
        if closing.weights_uri:
            mlflow.set_tag(f"{TAG_PREFIX}weights-uri", closing.weights_uri)
        status = {Outcome.SUCCEEDED: "FINISHED", Outcome.PREEMPTED: "KILLED"}
        mlflow.end_run(status.get(closing.outcome, "FAILED"))

    def drop(self) -> None:
        """End the process's active MLflow run: the next run in this process starts clean
        (the run is taken off the stack before the server is told, which may fail)."""
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            with contextlib.suppress(Exception):
                mlflow.end_run("FAILED")

    def _setenv(self, key: str, value: str) -> None:
        self._saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def _exists(self, run_id: str) -> bool:
        """Whether the server has the run of an earlier attempt (else a new run starts)."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            MlflowClient().get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return False
            raise
        return True

    def restore(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of an http(s) tracking server (None for Databricks,
    whose workspace URL the spec does not name)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class WandbTracker(Tracker):
    """A Weights & Biases run: online (WANDB_API_KEY authenticates) or offline under
    <output>/wandb/ (upload later with `wandb sync`)."""

    name = "wandb"

    def __init__(self, run: RunConfig, out: Path, spec: WandbSpec) -> None:
        super().__init__(run, out)
        self.spec = spec
        self._run: Any = None

    def make_callback(self) -> Any:
        from transformers.integrations import WandbCallback

        return WandbCallback()

    def open(self, opening: Opening) -> None:
        import wandb

        spec = self.spec
        identity = opening.identity
        tags = [*(spec.tags or []), "/".join(p for p in (identity.namespace, identity.name) if p)]
        self._run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            group=spec.group,
            tags=tags,
            name=opening.run_name,
            mode=spec.mode,
            dir=str(self.out),
            id=opening.resume_id,
            resume="allow" if opening.resume_id else None,
            job_type="fine-tune",
            config={
                "finetune": opening.hyperparameters,
                "dataset": opening.dataset,
                **identity.tags(),
            },
        )
        self.run_id = self._run.id
        if spec.mode == "online":
            self.url = self._run.url
        else:
            run_dir = Path(self._run.dir).parent  # <out>/wandb/offline-run-<time>-<id>
            self.location = output_files.join(
                self.run.output.uri, run_dir.relative_to(self.out).as_posix()
            )

    def close(self, closing: Closing) -> None:
        import wandb

        run = self._run
        run.summary.update(self.unlogged(closing))
        if closing.samples:
            columns = _columns(closing.samples)
            table = wandb.Table(
                columns=list(columns), data=list(zip(*columns.values(), strict=True))
            )
            run.log({"samples": table, "train/global_step": closing.step})
        if closing.weights_uri:
            run.config.update({f"{TAG_PREFIX}weights-uri": closing.weights_uri})
        run.finish(exit_code=0 if closing.outcome == Outcome.SUCCEEDED else 1)


class TensorBoardTracker(Tracker):
    """Event files under <output>/tensorboard/ (any TensorBoard reads them from there)."""

    name = "tensorboard"

    def __init__(self, run: RunConfig, out: Path) -> None:
        super().__init__(run, out)
        self.dir = out / TENSORBOARD_DIR
        self.location = output_files.join(run.output.uri, TENSORBOARD_DIR)

    def _writer(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.dir))

    def make_callback(self) -> Any:
        from transformers.integrations import TensorBoardCallback

        return TensorBoardCallback(tb_writer=self._writer())

    def open(self, opening: Opening) -> None:
        writer = self.callback.tb_writer
        writer.add_text("finetune/job", _code(opening.identity.tags()))
        writer.add_text("finetune/hyperparameters", _code(opening.hyperparameters))
        writer.add_text("finetune/dataset", _code(opening.dataset))
        writer.flush()

    def close(self, closing: Closing) -> None:
        writer = self._writer()  # the callback closed its own at the end of training
        for key, value in self.unlogged(closing).items():
            writer.add_scalar(f"final/{key}", value, closing.step)
        if closing.samples:
            writer.add_text("finetune/samples", _code(closing.samples), closing.step)
        if closing.weights_uri:
            writer.add_text("finetune/weights", closing.weights_uri, closing.step)
        writer.close()


def _code(value: Any) -> str:
    """JSON as a Markdown code block (TensorBoard renders text as Markdown)."""
    return "```\n" + json.dumps(value, indent=2, default=str) + "\n```"


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows of samples.jsonl as columns (the keys of the first row)."""
    return {key: [row.get(key) for row in rows] for key in rows[0]}


class _Guarded(TrainerCallback):  # type: ignore[misc]
    """Forwards the Trainer's events to a tracker's callback until it fails once; then the
    tracker is dropped (a warning, progress updated) and training goes on."""

    def __init__(self, tracker: Tracker, fail: Callable[[Tracker, str, BaseException], None]):
        self.tracker = tracker
        self.fail = fail


def _forward(event: str) -> Callable[..., Any]:
    def method(self: _Guarded, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        tracker = self.tracker
        if tracker.error is not None:
            return None
        try:
            result = getattr(tracker.callback, event)(args, state, control, **kwargs)
        except Exception as exc:  # a tracker's failure must not end the training
            self.fail(tracker, f"step {state.global_step}", exc)
            return None
        if event == "on_log" and kwargs.get("logs"):
            tracker.logged.update((k, state.global_step) for k in kwargs["logs"])
        return result

    method.__name__ = event
    return method


for _event in _EVENTS:
    setattr(_Guarded, _event, _forward(_event))


def _has_wandb_key() -> bool:
    """Whether W&B finds an API key: WANDB_API_KEY, or a ~/.netrc entry (`wandb login`)."""
    if os.environ.get(ENV_WANDB_API_KEY):
        return True
    try:
        entries = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any(host.endswith("wandb.ai") for host in entries)


def preflight(tracking: TrackingSpec | None) -> None:
    """Refuse what would fail every tracker call: a client that is not installed, W&B online
    without an API key (raises InvalidInputError)."""
    if tracking is None:
        return
    import importlib.util

    for name in tracking.enabled():
        if importlib.util.find_spec(CLIENTS[name]) is None:
            raise InvalidInputError(
                f"tracking.{name}: the {CLIENTS[name]} client is not installed (it is in the "
                "trainer image; locally: pip install 'finetune-operator[trainer]')"
            )
    if tracking.wandb is not None and tracking.wandb.mode == "online" and not _has_wandb_key():
        raise InvalidInputError(
            "tracking.wandb: no API key: set WANDB_API_KEY (on a cluster: spec.secrets.wandb "
            "names the Secret), or set tracking.wandb.mode: offline"
        )


class Experiments:
    """The trackers of one run (none on ranks other than 0, none without spec.tracking)."""

    def __init__(
        self,
        run: RunConfig,
        out: Path,
        identity: JobIdentity,
        is_main: bool,
        on_change: Callable[[list[TrackerInfo]], None] | None = None,
    ) -> None:
        self.run = run
        self.identity = identity
        self.on_change = on_change
        self.trackers: list[Tracker] = []
        tracking = run.tracking
        if tracking is None or not is_main:
            return
        if tracking.mlflow is not None:
            self.trackers.append(MlflowTracker(run, out, tracking.mlflow))
        if tracking.wandb is not None:
            self.trackers.append(WandbTracker(run, out, tracking.wandb))
        if tracking.tensorboard:
            self.trackers.append(TensorBoardTracker(run, out))

    def _fail(self, tracker: Tracker, when: str, exc: BaseException) -> None:
        tracker.error = f"{when}: {type(exc).__name__}: {first_line(exc)}"[:512]
        log.warning(
            "tracking.%s: stopped reporting (%s); training goes on without it",
            tracker.name,
            tracker.error,
        )
        tracker.drop()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.infos())

    def _each(
        self, when: str, action: Callable[[Tracker], None], trackers: list[Tracker] | None = None
    ) -> None:
        for tracker in self.live if trackers is None else trackers:
            try:
                action(tracker)
            except Exception as exc:  # a tracker's failure must not end the run
                self._fail(tracker, when, exc)

    @property
    def live(self) -> list[Tracker]:
        """The trackers that have not failed."""
        return [t for t in self.trackers if t.error is None]

    def callbacks(self) -> list[Any]:
        """The Trainer callbacks: each tracker's integration, guarded."""
        self._each("setup", lambda t: t.callback)
        # one class per tracker: the Trainer holds at most one callback of each class
        return [type(f"Guarded{t.name.title()}", (_Guarded,), {})(t, self._fail) for t in self.live]

    def open(self, hyperparameters: dict[str, Any], dataset: dict[str, Any]) -> None:
        """Open every tracker's run (reattach to the runs of an earlier attempt), record the
        hyperparameters, the dataset report and the job's identity."""
        if not self.trackers:
            return
        ids = self._read_ids()
        tracking = self.run.tracking
        run_name = (tracking.run_name if tracking else None) or self.identity.name

        def start(tracker: Tracker) -> None:
            tracker.open(
                Opening(run_name, self.identity, hyperparameters, dataset, ids.get(tracker.name))
            )
            tracker.opened = True

        self._each("start", start)
        self._write_ids()
        for tracker in self.live:
            log.info("tracking.%s: %s", tracker.name, tracker.url or tracker.location)
        self._changed()

    def close(self, closing: Closing) -> None:
        """Record the results in every tracker still reporting and end their runs."""
        opened = [t for t in self.live if t.opened]
        self._each("end", lambda t: t.close(closing), opened)
        for tracker in self.trackers:
            tracker.opened = False
            tracker.restore()
        if opened:
            self._changed()

    def infos(self) -> list[TrackerInfo]:
        """Every tracker's link and state."""
        return [t.info() for t in self.trackers]

    def _ids_uri(self) -> str:
        return output_files.join(self.run.output.uri, IDS_FILE)

    def _read_ids(self) -> dict[str, str]:
        try:
            text = output_files.read_text(self._ids_uri())
            ids = json.loads(text) if text else {}
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s): new tracker runs", IDS_FILE, first_line(exc))
            return {}
        return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}

    def _write_ids(self) -> None:
        ids = {t.name: t.run_id for t in self.live if t.run_id}
        if ids:
            output_files.write_text(self._ids_uri(), json.dumps(ids, sort_keys=True) + "\n")


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The generation eval's samples.jsonl rows (none when it was not written)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def numeric(metrics: Iterable[tuple[str, Any]]) -> dict[str, float]:
    """The metrics that are numbers (not booleans), as floats."""
    return {
        k: float(v) for k, v in metrics if isinstance(v, int | float) and not isinstance(v, bool)
    }
