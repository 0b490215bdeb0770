"""What a GPU holds and computes: memory and dense bf16 peak by type name, `--gpu-memory`
quantities, and the effective throughput our trainer reaches (from docs/benchmarks.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GpuType:
    """A GPU model: usable memory (bytes) and dense bf16 peak FLOP/s."""

    name: str
    memory: int
    peak_flops: float


# Matched by name fragment, most specific first (nvidia.com/gpu.product values such as
# NVIDIA-H100-80GB-HBM3 or NVIDIA-A100-SXM4-40GB match "H100" and "A100" + "40GB").
GPU_TYPES: tuple[GpuType, ...] = (
    GpuType("H200", 143_771 * 2**20, 989.4e12),
    GpuType("H100 PCIe", 81_559 * 2**20, 756.0e12),
    GpuType("H100", 81_559 * 2**20, 989.4e12),
    GpuType("A100-40GB", 40_960 * 2**20, 312.0e12),
    GpuType("A100", 81_920 * 2**20, 312.0e12),
    GpuType("L40S", 46_068 * 2**20, 362.05e12),
    GpuType("L4", 23_034 * 2**20, 121.0e12),
    GpuType("A10G", 23_028 * 2**20, 70.0e12),
    GpuType("T4", 15_360 * 2**20, 65.0e12),
)
PEAK_BF16_FLOPS = {g.name: g.peak_flops for g in GPU_TYPES}

# Model FLOPs utilisation of the trainer's own path on GPU, warm (docs/benchmarks.md): the
# lowest and highest measured (QLoRA 1B 11.4 %, LoRA 1B 16.0 %; the 8B runs 12.0-15.1 %),
# widened to whole percents.
MFU_RANGE = (0.11, 0.17)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def gpu_type(name: str) -> GpuType | None:
    """The GPU type a name (product label, `torch.cuda.get_device_name()`) refers to."""
    key = _key(name)
    for gpu in GPU_TYPES:
        parts = [_key(p) for p in re.split(r"[- ]", gpu.name)]
        if all(p in key for p in parts):
            return gpu
    return None


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name (None when unknown)."""
    found = gpu_type(device_name)
    return found.peak_flops if found else None


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_memory(text: str) -> int:
    """Bytes of a memory quantity: `80Gi`, `80GiB`, `80G`, `80GB`, `81559Mi`, plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a memory size such as 80Gi or 24GB")
    number, unit, binary = match.groups()
    scale = 1024 ** ("kmgt".index(unit.lower()) + 1) if binary and unit else _UNITS[unit.lower()]
    return int(float(number) * scale)
