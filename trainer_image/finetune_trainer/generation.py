"""Generation eval: answer held-out prompts and score the answers against the references.

The prompt of an example is everything before its last completion span (the last assistant
turn of a chat, the output of an alpaca record); the reference is that span. Answers are
greedy. Scores: ROUGE-L F1 (rouge-score) and corpus BLEU (sacrebleu), both on the same
language-neutral tokens: words, with each CJK character a token of its own (the stock
tokenizers drop or merge non-Latin text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.methods import untuned

# a CJK ideograph, kana or hangul syllable is a token of its own; otherwise runs of word chars
_TOKEN_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|\w+")
GENERATION_BATCH = 8


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens; each CJK character is one token."""
    return _TOKEN_RE.findall(text.lower())


class _Tokenizer:
    """rouge-score's tokenizer interface over `tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


def split_prompt(input_ids: list[int], mask: list[int]) -> tuple[list[int], list[int]] | None:
    """(prompt, reference): the last contiguous completion span and everything before it.
    None when the example has no completion tokens or nothing before them."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    if start == 0 or start == end:
        return None
    return input_ids[:start], input_ids[start:end]


def score(answers: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-L F1 (mean over examples, 0..1) and corpus BLEU (0..100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    rouge = [
        scorer.score(ref, ans)["rougeL"].fmeasure
        for ans, ref in zip(answers, references, strict=True)
    ]
    bleu = sacrebleu.corpus_bleu(
        [" ".join(tokens(a)) for a in answers],
        [[" ".join(tokens(r)) for r in references]],
        tokenize="none",
    )
    return {"rouge_l": sum(rouge) / len(rouge) if rouge else 0.0, "bleu": float(bleu.score)}


@dataclass
class HeldOut:
    """The prompts to answer and their reference completions (text)."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    references: list[str]


def _prompts_and_references(dataset: Any) -> Any:
    """(prompt, reference) token ids of each example that has both; for preference pairs the
    reference is the chosen answer."""
    if "prompt_ids" in dataset.column_names:
        yield from zip(dataset["prompt_ids"], dataset["chosen_ids"], strict=True)
        return
    for ids, mask in zip(dataset["input_ids"], dataset["completion_mask"], strict=True):
        split = split_prompt(list(ids), list(mask))
        if split is not None:
            yield split


def held_out(dataset: Any, tokenizer: Any, examples: int) -> HeldOut:
    """The first `examples` held-out examples that have a prompt and a completion."""
    prompts, prompt_texts, references = [], [], []
    for prompt, reference in _prompts_and_references(dataset):
        prompt = list(prompt)
        prompts.append(prompt)
        prompt_texts.append(tokenizer.decode(prompt, skip_special_tokens=False))
        references.append(tokenizer.decode(reference, skip_special_tokens=True).strip())
        if len(prompts) == examples:
            break
    return HeldOut(prompts, prompt_texts, references)


def generate(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy answers to `prompts` (token ids), in batches, left-padded."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), GENERATION_BATCH):
            batch = prompts[start : start + GENERATION_BATCH]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            attention = torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device
            )
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    use_cache=True,
                )
            for row in out[:, width:].tolist():
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


class GenerationEval:
    """The untuned model's answers first (adapter disabled), then the tuned model's; scores
    for both and the answers side by side in samples.jsonl."""

    def __init__(self, held: HeldOut, max_new_tokens: int) -> None:
        self.held = held
        self.max_new_tokens = max_new_tokens
        self.baseline_answers: list[str] = []

    def answer_untuned(self, model: Any, tokenizer: Any) -> None:
        """Answers of the model before training (a PEFT model with its adapter disabled)."""
        with untuned(model):
            self.baseline_answers = generate(
                model, tokenizer, self.held.prompts, self.max_new_tokens
            )

    def answer_tuned(self, model: Any, tokenizer: Any, out: Path) -> dict[str, float]:
        """Answers of the trained model; writes samples.jsonl and returns the metrics."""
        answers = generate(model, tokenizer, self.held.prompts, self.max_new_tokens)
        tuned = score(answers, self.held.references)
        base = score(self.baseline_answers, self.held.references)
        with (out / "samples.jsonl").open("w") as f:
            for prompt, reference, answer, baseline in zip(
                self.held.prompt_texts,
                self.held.references,
                answers,
                self.baseline_answers,
                strict=True,
            ):
                row = {"prompt": prompt, "reference": reference, "answer": answer}
                f.write(json.dumps({**row, "baseline_answer": baseline}, ensure_ascii=False))
                f.write("\n")
        return {
            "generation_examples": len(answers),
            "generation_rouge_l": tuned["rouge_l"],
            "generation_bleu": tuned["bleu"],
            "baseline_generation_rouge_l": base["rouge_l"],
            "baseline_generation_bleu": base["bleu"],
        }
