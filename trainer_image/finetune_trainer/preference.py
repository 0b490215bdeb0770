"""Preference tuning (training.objective dpo | orpo): TRL's trainers on our tokenized pairs, and
the preference scores of a model on held-out pairs.

The data pipeline already rendered, tokenized, checked and cut every pair (prompt_ids,
chosen_ids, rejected_ids), so the trainers take those columns as they are instead of
tokenizing the text again. DPO's reference model: with an adapter, the same model with the
adapter disabled (no second copy of the weights); a full fine-tune keeps a frozen copy of the
initial weights. ORPO needs no reference model.

Imports TRL and torch: import this module only where a preference run is built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from finetune_trainer.config import RunConfig

#: Pairs per forward pass when scoring (each pair is two sequences).
SCORE_BATCH = 4


class PairDPOTrainer(DPOTrainer):  # type: ignore[misc]
    """DPOTrainer that trains on the pipeline's tokenized pairs as they are."""

    def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, *args, **kwargs)


class PairORPOTrainer(ORPOTrainer):  # type: ignore[misc]
    """ORPOTrainer that trains on the pipeline's tokenized pairs as they are."""

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
        """ORPO's columns from ours: each answer as prompt + answer, labels on the answer."""
        prompt = list(feature["prompt_ids"])
        out: dict[str, Any] = {
            "prompt_input_ids": prompt,
            "prompt_attention_mask": [1] * len(prompt),
        }
        for kind in ("chosen", "rejected"):
            answer = list(feature[f"{kind}_ids"])
            out[f"{kind}_input_ids"] = prompt + answer
            out[f"{kind}_attention_mask"] = [1] * (len(prompt) + len(answer))
            out[f"{kind}_labels"] = [-100] * len(prompt) + answer
        return out

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Evaluate, taking a split of ours as well (ORPO converts only the datasets it was
        built with)."""
        if eval_dataset is not None and "chosen_input_ids" not in eval_dataset.column_names:
            eval_dataset = eval_dataset.map(self.tokenize_row)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Count both sequences of each pair (ORPO's batches have no `input_ids`)."""
        mask = torch.cat(
            [inputs["chosen_attention_mask"].flatten(), inputs["rejected_attention_mask"].flatten()]
        )
        super()._track_num_input_tokens(
            {"input_ids": inputs["chosen_input_ids"], "attention_mask": mask}
        )


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def build_trainer(
    run: RunConfig,
    model: Any,
    tokenizer: Any,
    prepared: Any,
    args: dict[str, Any],
    callbacks: list[Any],
) -> Any:
    """The DPO or ORPO trainer of a preference run (a transformers Trainer subclass)."""
    common = {
        "model": model,
        "train_dataset": prepared.train,
        "eval_dataset": prepared.eval,
        "processing_class": tokenizer,
        "callbacks": callbacks,
    }
    t = run.training
    if t.objective == "orpo":
        assert t.orpo is not None
        config = ORPOConfig(**args, beta=t.orpo.lambda_, max_length=run.dataset.max_seq_length)
        return PairORPOTrainer(args=config, **common)
    assert t.dpo is not None
    dpo = t.dpo
    config = DPOConfig(
        **args,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing,
        max_length=None,  # the pipeline applied dataset.maxSeqLength and dataset.overlong
        dataset_num_proc=None,
    )
    peft = _is_peft(model)
    # Full fine-tuning: a frozen copy of the initial weights is the reference (TRL would
    # reload it from the model's path, which a dequantized GGUF or a pvc:// model is not).
    reference = None if peft else copy.deepcopy(model).requires_grad_(False).eval()
    trainer = PairDPOTrainer(ref_model=reference, args=config, **common)
    if peft and "ref" in model.peft_config:
        # TRL adds a frozen copy of a freshly initialised adapter as the reference; that is the
        # base model's behaviour, which disabling the adapter gives without the copy (and
        # without a second adapter in every checkpoint and in adapter/).
        model.delete_adapter("ref")
    return trainer


@dataclass(frozen=True)
class PreferenceScores:
    """How a model ranks held-out pairs by mean log-probability per answer token."""

    pairs: int
    accuracy: float  # share of pairs where chosen scores higher than rejected
    margin: float  # mean of (chosen - rejected), in nats per token

    def metrics(self, prefix: str) -> dict[str, float]:
        """`preference_accuracy`, `preference_margin`, `preference_pairs` under `prefix`."""
        return {
            f"{prefix}preference_accuracy": self.accuracy,
            f"{prefix}preference_margin": self.margin,
            f"{prefix}preference_pairs": float(self.pairs),
        }


def _answer_logps(model: Any, rows: list[tuple[list[int], list[int]]], pad: int) -> Any:
    """Mean log-probability of each answer's tokens after its prompt."""
    width = max(len(p) + len(a) for p, a in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, tokens) in enumerate(rows):
        n = len(prompt) + len(tokens)
        ids[i, :n] = torch.tensor(prompt + tokens)
        attention[i, :n] = 1
        answer[i, len(prompt) : n] = True
    ids, attention, answer = ids.to(device), attention.to(device), answer.to(device)
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
    targets, scored = ids[:, 1:], answer[:, 1:]
    logps = torch.log_softmax(logits[scored].float(), dim=-1)
    token_logps = logps.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(len(rows), device=device).index_add_(0, scored.nonzero()[:, 0], token_logps)
    return (sums / scored.sum(dim=1).clamp(min=1)).cpu()


def score_pairs(model: Any, tokenizer: Any, dataset: Any) -> PreferenceScores:
    """Rank every pair of `dataset` (prompt_ids/chosen_ids/rejected_ids) with `model`: the
    implicit reward of the mean log-probability per answer token (ORPO's, and a DPO-tuned
    model's preference without a reference), comparable before and after training."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), SCORE_BATCH):
                batch = dataset[start : start + SCORE_BATCH]
                prompts = [list(p) for p in batch["prompt_ids"]]
                rows = [(p, list(a)) for p, a in zip(prompts, batch["chosen_ids"], strict=True)]
                rows += [(p, list(a)) for p, a in zip(prompts, batch["rejected_ids"], strict=True)]
                logps = _answer_logps(model, rows, pad).tolist()
                chosen += logps[: len(prompts)]
                rejected += logps[len(prompts) :]
    finally:
        model.train(was_training)
    n = len(chosen)
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True))
    return PreferenceScores(n, wins / n if n else 0.0, margin / n if n else 0.0)
