"""Operator latency and scale: the real operator against kmock's Kubernetes emulator.

    python bench/operator_bench.py                # N = 100
    python bench/operator_bench.py --n 1000
    python bench/operator_bench.py --n 1000 --rate 50   # paced creations (per second)
    python bench/operator_bench.py --n 1000 --rate 20 --pods --served-objects --waves 2
    python bench/operator_bench.py --server http://127.0.0.1:8001 --n 300 --rate 10 --out r.json

Starts kmock's KubernetesEmulator (the integration-test harness, tests/integration/harness.py)
on a local port and the real operator (`kopf run -m finetune_operator.main`) as a separate
process pointed at it through a kubeconfig; or, with ``--server`` (e.g. ``kubectl proxy``), a real cluster where the operator is
installed (nothing is started; latencies only).
Then it creates N FineTuneJobs and measures, from watch events:

- latency from each FineTuneJob's create request to the ADDED watch event of its Job
  (p50/p95/p99), and the server-side gap between the two creationTimestamps;
- time until all N are reconciled (status.jobName written by the operator);
- operator peak RSS (VmHWM) and CPU seconds (utime+stime) of the operator process;
- API requests the operator made per FineTuneJob (by verb and resource), counted by the
  emulator, over the whole run and in a quiet window afterwards (steady-state polling).

No kubelet runs. Without `--pods` the Jobs stay without pods, so the figures are for the
operator's own path (validate, ConfigMap, Job, status). With `--pods` the bench does what the
Job controller and the scheduler do on a real cluster: every Job gets its pods (one per index),
built from the Job's pod template and left Pending as unschedulable, so the operator watches
(and keeps) a pod per job and derives a status from it. `--served-objects` shapes what the bench
creates as a real API server serves it: `managedFields` on every FineTuneJob and pod, and
kubectl's `last-applied-configuration` annotation (a JSON copy of the object) on FineTuneJobs.
`--waves K` runs K rounds of create → measure → delete everything (the FineTuneJobs and, as
the garbage collector would, their children): the operator's RSS with N live jobs and after
deletion, per round, shows whether memory is held per live job or leaks across rounds.
`--operator-src DIR` runs the operator package found in DIR (e.g. the `operator/` folder of a
git worktree of an older commit), for a comparison on the same machine.

`--server URL` measures a real cluster where the operator is installed (latencies and
reconcile times; RSS and request counts are the cluster's to read), and writes `--out` too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402

BENCH_UA = "ftj-bench/1"
GROUP_PATH = "/apis/finetune.dev/v1alpha1"

SPEC: dict[str, Any] = {
    "model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"source": "pvc://data/train.jsonl", "format": "alpaca"},
    "method": {"type": "lora"},
    "training": {"maxSteps": 100},
    "output": {"uri": "pvc://outputs/bench"},
}


def _proc_stats(pid: int) -> dict[str, float]:
    """Peak RSS (bytes) and CPU seconds of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return {"peak_rss_bytes": hwm * 1024, "rss_bytes": rss * 1024, "cpu_seconds": cpu}


def wait_until_idle(pid: int, window: float = 5.0, limit: float = 600.0) -> float:
    """Wait until the process used under 2 % of a core over `window` seconds (it has worked
    through its backlog, e.g. the deletions); returns the seconds waited."""
    start = time.monotonic()
    cpu = _proc_stats(pid)["cpu_seconds"]
    while time.monotonic() - start < limit:
        time.sleep(window)
        now = _proc_stats(pid)["cpu_seconds"]
        if now - cpu < 0.02 * window:
            break
        cpu = now
    return time.monotonic() - start


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def start_emulator(tmp: Path) -> Any:
    """The integration harness's Cluster; its emulator counts the operator's requests."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    import harness

    harness.Emulator.ignored_agents = frozenset({harness.HARNESS_AGENT, BENCH_UA})
    return harness.Cluster(tmp)


def snapshot(cluster: Any) -> dict[str, int]:
    """Requests the operator made so far, by 'VERB resource' (the bench's own not counted)."""
    return dict(getattr(cluster.emulator, "counts", {}))


def managed_fields(obj: dict[str, Any], manager: str) -> list[dict[str, Any]]:
    """managedFields as a real API server writes them: the tree of the fields a manager set."""

    def tree(value: Any) -> Any:
        return {f"f:{k}": tree(v) for k, v in value.items()} if isinstance(value, dict) else {}

    fields = {k: obj[k] for k in ("metadata", "spec", "status") if k in obj}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [
        {
            "manager": manager,
            "operation": "Update",
            "apiVersion": obj.get("apiVersion", "v1"),
            "time": stamp,
            "fieldsType": "FieldsV1",
            "fieldsV1": tree(fields),
        }
    ]


def finetunejob_body(name: str, ns: str, served: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": SPEC,
    }
    if served:  # as `kubectl apply` and the API server would leave it
        applied = json.dumps(body, separators=(",", ":"))
        body["metadata"]["annotations"] = {
            "kubectl.kubernetes.io/last-applied-configuration": applied
        }
        body["metadata"]["managedFields"] = managed_fields(body, "kubectl-client-side-apply")
    return body


def pod_bodies(job: dict[str, Any], served: bool) -> list[dict[str, Any]]:
    """The pods the Job controller would create for `job` (one per index), left Pending as
    the scheduler leaves a pod no node can take."""
    meta, spec = job["metadata"], job["spec"]
    template = spec["template"]
    indexed = spec.get("completionMode") == "Indexed"
    pods = []
    for index in range(int(spec.get("completions") or 1)):
        suffix = uuid.uuid4().hex[:5]
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        labels = {
            **(template.get("metadata", {}).get("labels") or {}),
            "batch.kubernetes.io/job-name": meta["name"],
            "batch.kubernetes.io/controller-uid": meta.get("uid", ""),
        }
        if indexed:
            annotations["batch.kubernetes.io/job-completion-index"] = str(index)
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{index}-{suffix}"
                if indexed
                else f"{meta['name']}-{suffix}",
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta.get("uid", ""),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template["spec"],
            "status": {
                "phase": "Pending",
                "qosClass": "Guaranteed",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                ],
            },
        }
        if served:
            pod["metadata"]["managedFields"] = managed_fields(pod, "kube-controller-manager")
        pods.append(pod)
    return pods


async def delete_all(args: argparse.Namespace, server: str) -> float:
    """Delete the bench's FineTuneJobs and, as the garbage collector would, their ConfigMaps,
    Jobs, Services and pods. Returns the seconds it took."""
    import aiohttp

    ns = args.namespace
    paths = [
        f"{GROUP_PATH}/namespaces/{ns}/finetunejobs",
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        f"/api/v1/namespaces/{ns}/pods",
        f"/api/v1/namespaces/{ns}/configmaps",
        f"/api/v1/namespaces/{ns}/services",
    ]
    start = time.monotonic()
    sem = asyncio.Semaphore(args.concurrency)
    async with aiohttp.ClientSession(server, headers={"User-Agent": BENCH_UA}) as http:

        async def delete(path: str) -> None:
            async with sem, http.delete(path):
                pass

        for path in paths:
            async with http.get(path) as resp:
                items = (await resp.json()).get("items") or []
            names = [i["metadata"]["name"] for i in items]
            await asyncio.gather(*(delete(f"{path}/{n}") for n in names if n.startswith("bench-")))
    return time.monotonic() - start


async def run(args: argparse.Namespace, server: str, kubeconfig: Path | None) -> dict[str, Any]:
    import aiohttp

    ns = args.namespace
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}-{i:05d}" for i in range(args.n)]
    sent: dict[str, float] = {}
    created_ts: dict[str, float] = {}
    job_seen: dict[str, float] = {}
    job_server_gap: dict[str, float] = {}
    reconciled: dict[str, float] = {}
    all_jobs = asyncio.Event()
    all_reconciled = asyncio.Event()
    wanted = set(names)
    pod_tasks: list[asyncio.Task[None]] = []
    headers = {"User-Agent": BENCH_UA, "Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(server, headers=headers, timeout=timeout) as http:

        async def watch(path: str, on_event: Any) -> None:
            while True:
                try:
                    async with http.get(path, params={"watch": "true"}) as resp:
                        async for line in resp.content:
                            if line.strip():
                                on_event(json.loads(line), time.monotonic())
                except (TimeoutError, aiohttp.ClientError):
                    await asyncio.sleep(0.1)

        def on_job(event: dict[str, Any], now: float) -> None:
            obj = event.get("object") or {}
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            owner = next((r["name"] for r in refs if r.get("kind") == "FineTuneJob"), None)
            if owner in wanted and owner not in job_seen and event.get("type") == "ADDED":
                job_seen[owner] = now
                if args.pods:
                    pod_tasks.append(asyncio.create_task(create_pods(obj)))
                stamp = obj["metadata"].get("creationTimestamp")
                if stamp and owner in created_ts:
                    job_server_gap[owner] = _ts(stamp) - created_ts[owner]
                if len(job_seen) == len(wanted):
                    all_jobs.set()

        def on_ftj(event: dict[str, Any], now: float) -> None:
            obj = event.get("object") or {}
            name = obj.get("metadata", {}).get("name")
            status = obj.get("status") or {}
            if name in wanted and name not in reconciled and status.get("jobName"):
                reconciled[name] = now
                if len(reconciled) == len(wanted):
                    all_reconciled.set()

        async def create_pods(job: dict[str, Any]) -> None:
            for pod in pod_bodies(job, args.served_objects):
                async with http.post(f"/api/v1/namespaces/{ns}/pods", data=json.dumps(pod)) as r:
                    if r.status >= 300:
                        raise RuntimeError(f"create pod: {r.status} {await r.text()}")

        async def poll_reconciled() -> None:
            # kmock's watch does not carry status-subresource patches: list every 0.25 s
            while True:
                await asyncio.sleep(0.25)
                async with http.get(f"{GROUP_PATH}/namespaces/{ns}/finetunejobs") as resp:
                    doc = await resp.json()
                now = time.monotonic()
                for obj in doc.get("items") or []:
                    on_ftj({"object": obj}, now)

        watchers = [
            asyncio.create_task(watch(f"/apis/batch/v1/namespaces/{ns}/jobs", on_job)),
            asyncio.create_task(poll_reconciled()),
        ]
        await asyncio.sleep(0.5)
        sem = asyncio.Semaphore(args.concurrency)
        start = time.monotonic()

        async def create(i: int, name: str) -> None:
            if args.rate:
                delay = start + i / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            body = finetunejob_body(name, ns, args.served_objects)
            async with sem:
                sent[name] = time.monotonic()
                async with http.post(
                    f"{GROUP_PATH}/namespaces/{ns}/finetunejobs", data=json.dumps(body)
                ) as resp:
                    doc = await resp.json()
                    if resp.status >= 300:
                        raise RuntimeError(f"create {name}: {resp.status} {doc}")
                    stamp = doc.get("metadata", {}).get("creationTimestamp")
                    if stamp:
                        created_ts[name] = _ts(stamp)

        async def report() -> None:
            while True:
                await asyncio.sleep(5)
                print(
                    f"  {time.monotonic() - start:6.1f}s created {len(sent)}, jobs {len(job_seen)}, "
                    f"reconciled {len(reconciled)}",
                    file=sys.stderr,
                    flush=True,
                )

        reporter = asyncio.create_task(report())
        await asyncio.gather(*(create(i, n) for i, n in enumerate(names)))
        created_all = time.monotonic() - start
        try:
            await asyncio.wait_for(all_jobs.wait(), args.timeout)
            await asyncio.wait_for(all_reconciled.wait(), args.timeout)
        except TimeoutError:
            pass
        done = time.monotonic() - start
        await asyncio.gather(*pod_tasks)
        for task in [*watchers, reporter]:
            task.cancel()
    latencies = [job_seen[n] - sent[n] for n in names if n in job_seen]
    gaps = list(job_server_gap.values())
    return {
        "n": args.n,
        "jobs_seen": len(job_seen),
        "reconciled": len(reconciled),
        "create_seconds": created_all,
        "all_reconciled_seconds": done,
        "latency_p50": benchlib.percentile(latencies, 50),
        "latency_p95": benchlib.percentile(latencies, 95),
        "latency_p99": benchlib.percentile(latencies, 99),
        "latency_max": max(latencies) if latencies else None,
        # p50 per tenth of the run, in creation order: growth means the system saturates
        "latency_p50_by_tenth": [
            benchlib.percentile(chunk, 50)
            for i in range(10)
            if (chunk := latencies[i * len(latencies) // 10 : (i + 1) * len(latencies) // 10])
        ],
        "server_gap_p50": benchlib.percentile(gaps, 50),
        "server_gap_p99": benchlib.percentile(gaps, 99),
    }


def start_operator(
    cluster: Any, tmp: Path, src: Path | None, trace: Path | None
) -> subprocess.Popen[bytes]:
    """The real operator (`kopf run`) against the emulator; `src` overrides its package;
    `trace`: under tracemalloc (bench/traced_kopf.py), snapshots written there on SIGUSR2."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "FINETUNE_METRICS_PORT": "0"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve()), env.get("PYTHONPATH", "")])
    kopf = ["-m", "kopf"]
    if trace is not None:
        env["FINETUNE_BENCH_TRACE_OUT"] = str(trace)
        kopf = [str(HERE / "traced_kopf.py")]
    log = (tmp / "operator.log").open("w")
    command = [sys.executable, *kopf, "run", "--standalone", "--all-namespaces"]
    if os.environ.get("BENCH_VERBOSE"):
        command.append("--verbose")
    return subprocess.Popen(
        [*command, "-m", "finetune_operator.main"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def trace_memory(proc: subprocess.Popen[bytes], trace: Path | None, when: str) -> None:
    """Ask a traced operator for a snapshot of its live allocations and wait for it."""
    if trace is None:
        return
    taken = len(json.loads(trace.read_text())) if trace.exists() else 0
    proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 1200  # a snapshot of a busy traced process takes minutes
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            snapshots = json.loads(trace.read_text())
        except (OSError, ValueError):
            continue  # not written yet, or being written
        if len(snapshots) > taken:
            snapshots[-1]["when"] = when
            trace.write_text(json.dumps(snapshots, indent=1))
            return
    raise RuntimeError(f"no memory snapshot from the operator ({when})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100, help="FineTuneJobs to create")
    p.add_argument(
        "--rate", type=float, default=0.0, help="creations per second (0: as fast as possible)"
    )
    p.add_argument("--concurrency", type=int, default=16, help="create requests in flight")
    p.add_argument("--quiet-seconds", type=float, default=15.0, help="steady-state window after")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--namespace", default="default")
    p.add_argument(
        "--server",
        help="a real cluster's API, e.g. http://127.0.0.1:8001 from `kubectl proxy`, with the "
        "operator installed there (nothing is started; latencies only)",
    )
    p.add_argument("--token", default="", help="bearer token for --server")
    p.add_argument("--cleanup", action="store_true", help="delete the FineTuneJobs afterwards")
    p.add_argument("--pods", action="store_true", help="give every Job its (Pending) pods")
    p.add_argument(
        "--served-objects",
        action="store_true",
        help="managedFields and kubectl's last-applied annotation on what the bench creates",
    )
    p.add_argument(
        "--waves", type=int, default=1, help="rounds of create, measure, delete everything"
    )
    p.add_argument(
        "--operator-src", type=Path, help="run the finetune_operator package found in this folder"
    )
    p.add_argument(
        "--trace-memory",
        action="store_true",
        help="run the operator under tracemalloc and report where its live memory is held "
        "(slows the operator: latencies are not comparable)",
    )
    p.add_argument("--out", type=Path, help="write results as JSON here")
    args = p.parse_args(argv)

    if args.server:  # a real cluster: latencies only (the operator runs in the cluster)
        if args.pods or args.waves > 1 or args.operator_src or args.trace_memory:
            p.error("--pods, --waves, --operator-src, --trace-memory: the emulator only")
        server = args.server.rstrip("/")
        result = asyncio.run(run(args, server, None))
        if args.cleanup:
            result["delete_seconds"] = asyncio.run(delete_all(args, server))
        result.update(server=True, rate=args.rate, concurrency=args.concurrency)
        return report(result, args.out)

    tmp = Path(tempfile.mkdtemp(prefix="opbench-"))
    cluster = start_emulator(tmp)
    waves: list[dict[str, Any]] = []
    trace = tmp / "memory-trace.json" if args.trace_memory else None
    with cluster:
        proc = start_operator(cluster, tmp, args.operator_src, trace)
        try:
            # ready = the operator has reconciled one FineTuneJob
            ready_started = time.monotonic()
            warm = argparse.Namespace(**{**vars(args), "n": 1, "rate": 0.0, "pods": False})
            warm_result = asyncio.run(run(warm, cluster.url, cluster.kubeconfig))
            startup = time.monotonic() - ready_started
            asyncio.run(delete_all(args, cluster.url))
            time.sleep(2)
            rss_idle = _proc_stats(proc.pid)["rss_bytes"]
            for wave in range(args.waves):
                before = snapshot(cluster)
                stats_before = _proc_stats(proc.pid)
                wave_result = asyncio.run(run(args, cluster.url, cluster.kubeconfig))
                after = snapshot(cluster)
                time.sleep(args.quiet_seconds)
                quiet = snapshot(cluster)
                stats = _proc_stats(proc.pid)
                trace_memory(proc, trace, f"wave {wave + 1}: {args.n} live")
                wave_result.update(
                    operator_rss_live_bytes=stats["rss_bytes"],
                    operator_peak_rss_bytes=stats["peak_rss_bytes"],
                    operator_cpu_seconds=stats["cpu_seconds"] - stats_before["cpu_seconds"],
                    run_requests={k: after.get(k, 0) - before.get(k, 0) for k in after},
                    quiet_requests={k: quiet.get(k, 0) - after.get(k, 0) for k in quiet},
                )
                if wave + 1 < args.waves or args.cleanup:
                    wave_result["delete_seconds"] = asyncio.run(delete_all(args, cluster.url))
                    time.sleep(args.quiet_seconds)
                    # measured once the operator has processed the deletions (a loaded or
                    # traced operator lags far behind the API server)
                    wave_result["settle_seconds"] = wait_until_idle(proc.pid)
                    wave_result["operator_rss_after_delete_bytes"] = _proc_stats(proc.pid)[
                        "rss_bytes"
                    ]
                    trace_memory(proc, trace, f"wave {wave + 1}: deleted")
                waves.append(wave_result)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    bench_cpu = resource.getrusage(resource.RUSAGE_SELF)
    n = args.n
    result = dict(waves[0])
    run_requests, quiet_requests = result.pop("run_requests"), result.pop("quiet_requests")
    result.update(
        startup_to_first_job_seconds=startup,
        warmup_latency=warm_result["latency_p50"],
        operator_rss_idle_bytes=rss_idle,
        operator_rss_bytes=result["operator_rss_live_bytes"],
        requests_per_job=sum(run_requests.values()) / n,
        requests_by_kind_per_job={k: round(v / n, 3) for k, v in sorted(run_requests.items()) if v},
        quiet_seconds=args.quiet_seconds,
        quiet_requests_per_job_per_minute=sum(quiet_requests.values())
        / n
        * 60
        / args.quiet_seconds,
        quiet_by_kind={k: v for k, v in sorted(quiet_requests.items()) if v},
        waves=[
            {
                k: w.get(k)
                for k in (
                    "latency_p50",
                    "latency_p99",
                    "all_reconciled_seconds",
                    "operator_rss_live_bytes",
                    "operator_rss_after_delete_bytes",
                    "settle_seconds",
                    "operator_peak_rss_bytes",
                    "operator_cpu_seconds",
                )
            }
            for w in waves
        ],
        emulator_and_bench_cpu_seconds=bench_cpu.ru_utime + bench_cpu.ru_stime,
        rate=args.rate,
        concurrency=args.concurrency,
        pods=args.pods,
        served_objects=args.served_objects,
        operator_src=str(args.operator_src or ""),
        memory_trace=json.loads(trace.read_text()) if trace is not None else None,
        cpus=os.cpu_count(),
        load_avg=os.getloadavg(),
    )
    return report(result, args.out)


def report(result: dict[str, Any], out: Path | None) -> int:
    """Print the results (rounded) and write them as JSON to `out`."""
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(shown, indent=1))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
