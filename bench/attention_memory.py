"""Memory of attention over one padding-free row, as the row grows: SDPA with the
block-diagonal mask transformers materialises from position_ids, against FlexAttention's
document mask (the trainer's varlen path on CUDA).

    python bench/attention_memory.py                      # CPU, rows of 1k..16k tokens
    python bench/attention_memory.py --device cuda --lengths 2048,8192,32768

Each kernel runs in its own process: a one-layer Llama body (no LM head, so attention is
nearly all of the memory) gets a row of long-tailed documents (benchlib.sample_lengths at
maxSeqLength 2048) concatenated to L tokens with position_ids restarting per document. One
untimed call per length first (FlexAttention compiles), then the measured call: the peak
memory above what was held before it (CPU: peak RSS, VmHWM reset through
/proc/self/clear_refs; CUDA: max_memory_allocated). On CPU FlexAttention has no backward, so
the comparison is forward-only (`--train` adds SDPA forward+backward; on CUDA both kernels
train). Reported as ratios: the growth exponent log(mem(L)/mem(L0)) / log(L/L0) is 1 for
memory linear in tokens and 2 for a (tokens x tokens) mask (fitted over the upper half of
the lengths: short rows sit in allocator noise).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

KERNELS = ("sdpa", "flex_attention")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _row(length: int, seed: int) -> tuple[list[int], list[int]]:
    """Token ids and position_ids of one row of long-tailed documents, `length` tokens."""
    docs = benchlib.sample_lengths(max(64, length // 16), 2048, seed)
    positions: list[int] = []
    for n in docs:
        take = min(n, length - len(positions))
        positions.extend(range(take))
        if len(positions) == length:
            break
    ids = [2 + (i * 7919) % 250 for i in range(len(positions))]
    return ids, positions


def measure(kernel: str, lengths: list[int], device: str, train: bool) -> dict[str, int]:
    """Peak bytes of one forward (and backward with `train`) per row length, this process."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    model = LlamaModel._from_config(config, attn_implementation=kernel).to(device)

    def call(length: int) -> None:
        ids, pos = _row(length, seed=length)
        x = torch.tensor([ids], device=device)
        p = torch.tensor([pos], device=device)
        with contextlib.nullcontext() if train else torch.no_grad():
            out = model(input_ids=x, position_ids=p, use_cache=False).last_hidden_state
            if train:
                out.float().pow(2).mean().backward()
                model.zero_grad(set_to_none=True)
        del out

    peaks: dict[str, int] = {}
    for length in lengths:
        call(length)  # compile / first-call allocations
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call(length)
            torch.cuda.synchronize()
            peaks[str(length)] = int(torch.cuda.max_memory_allocated() - before)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _status_kib("VmRSS")
            call(length)
            peaks[str(length)] = (_status_kib("VmHWM") - before) * 1024
    return peaks


def growth(peaks: dict[str, int]) -> dict[str, float]:
    """Memory ratio of each row length to the previous one, and the exponent of the growth
    over the upper half of the lengths (log-log slope; short rows sit in allocator noise)."""
    items = sorted((int(k), v) for k, v in peaks.items())
    out: dict[str, float] = {}
    for (n0, m0), (n1, m1) in itertools.pairwise(items):
        out[f"{n1}/{n0}"] = m1 / max(m0, 1)
    (n0, m0), (n1, m1) = items[len(items) // 2], items[-1]
    out["exponent"] = math.log(max(m1, 1) / max(m0, 1)) / math.log(n1 / n0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--train", action="store_true", help="also SDPA forward+backward (CPU)")
    p.add_argument("--kernel", help=argparse.SUPPRESS)  # one kernel, in a child process
    p.add_argument("--out", type=Path, help="write results as JSON here")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.kernel:
        kernel, train = args.kernel.removesuffix("+train"), args.kernel.endswith("+train")
        print(json.dumps(measure(kernel, lengths, args.device, train)))
        return 0
    runs = list(KERNELS)
    if args.train or args.device == "cuda":
        runs = ["sdpa+train", "flex_attention+train", *runs] if args.device == "cuda" else runs
        if args.device == "cpu":
            runs.append("sdpa+train")
    results: dict[str, Any] = {}
    for run in runs:
        child = [sys.executable, __file__, "--kernel", run, "--lengths", args.lengths]
        done = subprocess.run(
            [*child, "--device", args.device], capture_output=True, text=True, check=False
        )
        if done.returncode:
            results[run] = {"error": done.stderr.strip().splitlines()[-1][:300]}
            continue
        peaks = json.loads(done.stdout.strip().splitlines()[-1])
        results[run] = {"peak_bytes": peaks, **growth(peaks)}
    print(f"\n{'kernel':<22}" + "".join(f"{n:>11}" for n in lengths) + f"{'exponent':>10}")
    for run, r in results.items():
        if "error" in r:
            print(f"{run:<22} {r['error']}")
            continue
        cells = "".join(f"{r['peak_bytes'][str(n)] / 2**20:>8.1f}MiB" for n in lengths)
        print(f"{run:<22}{cells}{r['exponent']:>10.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"argv": sys.argv, "device": args.device, "lengths": lengths, "results": results}
        args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
