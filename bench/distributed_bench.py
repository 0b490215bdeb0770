"""Distributed training on this machine: tokens/s with 1 and 2 workers, and how long the other
ranks take to stop after one worker is killed.

    python bench/distributed_bench.py --out bench/results/cpu2-distributed.json

Every run goes through the real entrypoint (`python -m finetune_trainer`, the launcher for
more than one worker) on a tiny random Llama built here (hidden 256, 4 layers, seq 256) and
the bundled instruction set. Arms run alternately (1, 2, 1, 2, ...) so machine drift hits both.

- `scaling`: the same per-worker batch (4) for N steps; tokens/s is the trainer's own
  `train_tokens_per_second` of the last step (global tokens over training time). On CPU a
  single worker uses every core (intra-op threads) while each of 2 workers gets one (the
  launcher sets OMP_NUM_THREADS=1), so the ratio shows what data parallelism buys over
  threading on this machine, not GPU scaling.
- `kill`: 2 pods x 1 worker on loopback; once a checkpoint exists, SIGKILL the worker of
  pod 1; seconds until both launchers exited (pod 1's launcher stops its own; pod 0's rank
  sees the lost peer in its next collective).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "instructions.jsonl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_model(out: Path) -> Path:
    """A random Llama with the tests' byte-level tokenizer trained on the instruction set."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # the tests' tokenizer builder (tests/conftest.py, loaded by path: not a package)
    found = importlib.util.spec_from_file_location("tests_conftest", REPO / "tests" / "conftest.py")
    assert found is not None and found.loader is not None
    conftest = importlib.util.module_from_spec(found)
    found.loader.exec_module(conftest)
    conftest.build_tiny_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def config(model: Path, out: Path, steps: int, save_steps: int) -> dict[str, Any]:
    return {
        "model": {"source": str(model)},
        "dataset": {"source": str(DATA), "format": "alpaca", "maxSeqLength": 256},
        "method": {"type": "lora"},
        "training": {
            "maxSteps": steps,
            "batchSize": 4,
            "saveSteps": save_steps,
            "loggingSteps": 1,
            "learningRate": 0.001,
        },
        "output": {"uri": str(out)},
    }


def start(work: Path, cfg: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[bytes]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(cfg))
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PET_", "FINETUNE_"))},
        "FINETUNE_CONFIG": str(work / "config.json"),
        "FINETUNE_PROGRESS_PORT": "0",
        "FINETUNE_TERMINATION_MESSAGE_PATH": str(work / "termination-log"),
        **env,
    }
    log = (work / "log.txt").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer"], env=full, stdout=log, stderr=log
    )


def group_env(nnodes: int, nproc: int, node: int, port: int) -> dict[str, str]:
    if nnodes * nproc == 1:
        return {}
    return {
        "PET_NNODES": str(nnodes),
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_NODE_RANK": str(node),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
    }


def scaling_run(tmp: Path, model: Path, workers: int, steps: int, label: str) -> float:
    """Tokens/s of one run with `workers` processes on this machine."""
    out = tmp / label / "out"
    proc = start(
        tmp / label, config(model, out, steps, 10_000), group_env(1, workers, 0, free_port())
    )
    if proc.wait() != 0:
        raise SystemExit(f"{label} failed: see {tmp / label / 'log.txt'}")
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return float([r for r in rows if "train_tokens_per_second" in r][-1]["train_tokens_per_second"])


def worker_pid(launcher: int) -> int:
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return int(children[0])


def kill_run(tmp: Path, model: Path, label: str) -> float:
    """Seconds from SIGKILL of pod 1's worker until both pods' launchers exited."""
    out = tmp / label / "out"
    cfg = config(model, out, 200, 5)
    port = free_port()
    pods = [start(tmp / label / f"n{i}", cfg, group_env(2, 1, i, port)) for i in range(2)]
    marker = out / "checkpoints" / "checkpoint-5" / ".finetune-complete.json"
    deadline = time.monotonic() + 600
    while not marker.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{label}: no checkpoint-5")
        time.sleep(0.2)
    os.kill(worker_pid(pods[1].pid), signal.SIGKILL)
    killed = time.monotonic()
    for pod in pods:
        pod.wait(600)
    return time.monotonic() - killed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per scaling run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distributed-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        model = build_model(tmp / "model")
        one: list[float] = []
        two: list[float] = []
        for i in range(args.repeats):
            one.append(scaling_run(tmp, model, 1, args.steps, f"one-{i}"))
            two.append(scaling_run(tmp, model, 2, args.steps, f"two-{i}"))
            print(f"repeat {i}: 1 worker {one[-1]:.0f} tokens/s, 2 workers {two[-1]:.0f}")
        stops = [kill_run(tmp, model, f"kill-{i}") for i in range(args.repeats)]
        print("stop after SIGKILL: " + ", ".join(f"{s:.1f} s" for s in stops))
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    result = {
        "cpus": os.cpu_count(),
        "steps": args.steps,
        "tokens_per_second": {"1_worker": one, "2_workers": two},
        "ratio_2_over_1": {"median": benchlib.median(ratios), "runs": ratios},
        "stop_after_sigkill_seconds": {"median": benchlib.median(stops), "runs": stops},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
