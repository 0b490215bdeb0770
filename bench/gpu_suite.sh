#!/usr/bin/env bash
# The CUDA benchmark suite (bench/trainer_bench.py), as run for docs/benchmarks.md.
#   bash bench/gpu_suite.sh OUTDIR 1b     # Llama-3.2-1B shape: lora (+ablations), qlora, full
#   bash bench/gpu_suite.sh OUTDIR 1b-lora  # only the 1B LoRA ablations
#   bash bench/gpu_suite.sh OUTDIR 8b     # Llama-3.1-8B shape: lora, qlora (batch 8 and 1),
#                                         # attention memory, and the 1B LoRA check
# Needs the trainer and gpu extras installed (trl, peft, bitsandbytes, datasets, liger-kernel;
# flash-attn optional: the trl-expert arm uses it when present).
set -u
out=${1:?output dir}
part=${2:-1b}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
bench() { python3 "$here/trainer_bench.py" --device cuda "$@" 2>&1 | grep -v -i -e "warn" -e "Loading weights" -e "Writing model"; }
case "$part" in
  1b)
    bench --model llama-3.2-1b --method lora --arms ours,baseline,ours-padded,ours-packed,ours-noliger \
      --steps 20 --rounds 2 --out "$out/1b-lora.json"
    bench --model llama-3.2-1b --method qlora --steps 20 --rounds 2 --out "$out/1b-qlora.json"
    bench --model llama-3.2-1b --method full --batch 4 --steps 20 --rounds 2 --out "$out/1b-full.json"
    ;;
  1b-lora)
    bench --model llama-3.2-1b --method lora --arms ours,baseline,ours-padded,ours-packed,ours-noliger \
      --steps 20 --rounds 2 --out "$out/1b-lora.json"
    ;;
  8b)
    # issue 14: ours as the benchmark ran it, ours with default batch/attention/token budget,
    # the plain recipe, the expert TRL recipe, and ours without the varlen kernel (sdpa)
    bench --model llama-3.1-8b --method lora --arms ours-defaults,trl-expert,ours,baseline,ours-sdpa \
      --steps 10 --rounds 2 --warmup-steps 2 --profile ours,ours-defaults,trl-expert \
      --out "$out/8b-lora.json"
    # the kernel alone: peak memory of attention over growing padding-free rows
    python3 "$here/attention_memory.py" --device cuda --lengths 2048,8192,32768 \
      --out "$out/attention-memory.json"
    bench --model llama-3.1-8b --method qlora --arms ours-defaults,trl-expert,ours,baseline \
      --steps 10 --rounds 1 --warmup-steps 2 --out "$out/8b-qlora.json"
    # the memory target (QLoRA 8B peak <= 10 GiB at seq 2048): one sequence per step, with
    # checkpointing (auto would leave it off: batch 1 fits an 80 GB GPU without it)
    bench --model llama-3.1-8b --method qlora --arms ours --batch 1 --steps 10 --rounds 1 \
      --gradient-checkpointing true --warmup-steps 2 --out "$out/8b-qlora-batch1.json"
    # 1B: no regression against docs/benchmarks.md
    bench --model llama-3.2-1b --method lora --arms ours,ours-defaults,baseline,trl-expert \
      --steps 20 --rounds 2 --out "$out/1b-lora.json"
    ;;
esac
