"""Kernels: which attention kernel (`model.attention`) and whether Liger's kernels
(`training.ligerKernel`) auto picks, and that every batch layout (padded, padding-free, packed)
and attention kernel (sdpa, FlexAttention's document mask) computes the same loss on the tiny
model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.config import RunConfig
from finetune_trainer.errors import InvalidInputError
from finetune_trainer.models import ModelLoadError, attention_implementation
from finetune_trainer.runner import use_liger


def _run(method: str = "lora", attention: str = "auto") -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"source": "m", "attention": attention},
            "dataset": {"source": "d"},
            "method": {"type": method},
            "output": {"uri": "o"},
        }
    )


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Pretend exactly the packages in the returned set (flash_attn, ...) are installed."""
    present: set[str] = set()
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in ("flash_attn", "liger_kernel"):
            return object() if name in present else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return present


@pytest.mark.parametrize(
    ("device", "method", "packages", "chosen"),
    [
        ("cpu", "lora", set(), None),  # transformers' default: sdpa (eager without sdpa)
        ("cpu", "lora", {"flash_attn"}, None),  # flash-attn needs CUDA
        ("cuda", "lora", {"flash_attn"}, "flash_attention_2"),
        ("cuda", "qlora", set(), "flex_attention"),
        ("cuda", "full", set(), "flex_attention"),
        ("cuda", "prefix", set(), None),  # virtual tokens arrive as a key/value cache
        ("cuda", "prompt", set(), None),
    ],
)
def test_auto_order(
    installed: set[str], device: str, method: str, packages: set[str], chosen: str | None
) -> None:
    installed.update(packages)
    assert attention_implementation(_run(method), device) == chosen


def test_explicit_kernels_win_where_they_can_train(installed: set[str]) -> None:
    assert attention_implementation(_run(attention="sdpa"), "cuda") == "sdpa"
    assert attention_implementation(_run(attention="eager"), "cpu") == "eager"
    assert attention_implementation(_run(attention="flex_attention"), "cuda") == "flex_attention"
    with pytest.raises(ModelLoadError, match=r"^model.attention: flex_attention trains on CUDA"):
        attention_implementation(_run(attention="flex_attention"), "cpu")
    with pytest.raises(ModelLoadError, match=r"^model.attention: flash_attention_2 needs"):
        attention_implementation(_run(attention="flash_attention_2"), "cuda")
    installed.add("flash_attn")
    assert attention_implementation(_run(attention="flash_attention_2"), "cuda") == (
        "flash_attention_2"
    )


@pytest.mark.parametrize(
    ("setting", "device", "packages", "on"),
    [
        ("auto", "cuda", {"liger_kernel"}, True),
        ("auto", "cuda", set(), False),
        ("auto", "cpu", {"liger_kernel"}, False),  # Triton kernels: the CPU path is unchanged
        (False, "cuda", {"liger_kernel"}, False),
        (True, "cuda", {"liger_kernel"}, True),
    ],
)
def test_liger_auto(
    installed: set[str], setting: object, device: str, packages: set[str], on: bool
) -> None:
    installed.update(packages)
    run = RunConfig.model_validate(
        {
            "model": {"source": "m"},
            "dataset": {"source": "d"},
            "training": {"ligerKernel": setting},
            "output": {"uri": "o"},
        }
    )
    assert use_liger(run, device) is on


def test_liger_forced_where_it_cannot_run_is_an_input_error(installed: set[str]) -> None:
    run = RunConfig.model_validate(
        {
            "model": {"source": "m"},
            "dataset": {"source": "d"},
            "training": {"ligerKernel": True},
            "output": {"uri": "o"},
        }
    )
    with pytest.raises(InvalidInputError, match=r"^training.ligerKernel: .* need a CUDA GPU"):
        use_liger(run, "cpu")
    with pytest.raises(InvalidInputError, match=r"^training.ligerKernel: liger-kernel is not"):
        use_liger(run, "cuda")


def _examples(vocab: int) -> list[dict[str, Any]]:
    import sys

    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import benchlib
    finally:
        sys.path.remove(str(bench))
    ids, masks = benchlib.markov_examples([7, 19, 12, 30, 5], vocab, seed=3)
    return [{"input_ids": i, "completion_mask": m} for i, m in zip(ids, masks, strict=True)]


def _loss(model: Any, batch: dict[str, Any]) -> Any:
    batch = {k: v for k, v in batch.items() if k not in ("completion_mask", "seq_lengths")}
    return model(**batch, use_cache=False).loss


def test_padded_padding_free_packed_and_flex_give_the_same_loss(tiny_model_dir: Path) -> None:
    """One loss for the same examples whatever the layout: padded rows (sdpa), one
    padding-free row (sdpa with a block-diagonal mask), BFD-packed rows as the trainer packs
    them (TRL), and the padding-free row through FlexAttention's document mask (forward only:
    PyTorch has no FlexAttention backward on CPU)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    flex = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="flex_attention"
    )
    examples = _examples(sdpa.config.vocab_size)
    padded = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=False)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    packed_rows = pack_dataset(Dataset.from_list(examples), seq_length=40, strategy="bfd")
    assert len(packed_rows) < len(examples)  # several examples share a row
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(list(packed_rows))
    assert padded["input_ids"].shape[0] == len(examples) and flat["input_ids"].shape[0] == 1
    with torch.no_grad():
        losses = {
            "padded": float(_loss(sdpa, padded)),
            "padding-free": float(_loss(sdpa, flat)),
            "packed": float(_loss(sdpa, packed)),
            "flex": float(_loss(flex, flat)),
            "flex-packed": float(_loss(flex, packed)),
        }
    for name, value in losses.items():
        assert value == pytest.approx(losses["padded"], rel=1e-5), (name, losses)


def test_padding_free_gradients_equal_padded(tiny_model_dir: Path) -> None:
    """Training sees the same gradients, not only the same loss."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    examples = _examples(model.config.vocab_size)
    grads = []
    for flat in (False, True):
        model.zero_grad()
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=flat)(examples)
        _loss(model, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_the_document_mask_is_not_a_tokens_by_tokens_tensor() -> None:
    """For one padding-free row, transformers gives SDPA a materialised (tokens x tokens)
    boolean mask and FlexAttention a BlockMask of 128x128-token blocks: at 8k tokens the
    latter is under 1 % of the former (the memory measurement is bench/attention_memory.py)."""
    import torch
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    def mask_bytes(kernel: str, tokens: int) -> int:
        config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
        config._attn_implementation = kernel
        positions = (torch.arange(tokens) % 300).unsqueeze(0)  # documents of 300 tokens
        mask = create_causal_mask(
            config=config,
            inputs_embeds=torch.zeros(1, tokens, 64),
            attention_mask=None,
            cache=None,
            position_ids=positions,
        )
        tensors = [mask] if isinstance(mask, torch.Tensor) else mask.as_tuple()
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    assert mask_bytes("sdpa", 8192) == 8192 * 8192  # one bool per pair of tokens
    assert mask_bytes("flex_attention", 8192) < mask_bytes("sdpa", 8192) / 100
