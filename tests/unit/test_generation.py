"""Generation eval helpers: prompt/reference split, language-neutral tokens, scores."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from finetune_trainer.generation import GenerationEval, HeldOut, score, split_prompt, tokens


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        ([0, 0, 1, 1], ([10, 11], [12, 13])),
        ([0, 1, 1, 0], ([10], [11, 12])),  # trailing unmasked token (e.g. a template tail)
        ([0, 1, 0, 1], ([10, 11, 12], [13])),  # chat: the last assistant turn is the reference
        ([1, 1, 1, 1], None),  # text data: no prompt
        ([0, 0, 0, 0], None),  # no completion
    ],
)
def test_split_prompt_takes_the_last_completion_span(
    mask: list[int], expected: tuple[list[int], list[int]] | None
) -> None:
    assert split_prompt([10, 11, 12, 13], mask) == expected


def test_tokens_split_cjk_characters_and_lowercase_words() -> None:
    assert tokens("Fine-tuning 让通用模型 GPU!") == [
        "fine",
        "tuning",
        "让",
        "通",
        "用",
        "模",
        "型",
        "gpu",
    ]


def test_identical_answers_score_full_marks_and_disjoint_ones_zero() -> None:
    refs = ["the cat sat on the mat today", "微调让通用模型变成专属模型"]
    perfect = score(refs, refs)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["bleu"] == pytest.approx(100.0)
    wrong = score(["dogs bark loudly at night", "完全不同的句子内容"], refs)
    assert wrong["rouge_l"] == 0.0
    assert wrong["bleu"] < 1.0


def test_partial_overlap_scores_between() -> None:
    result = score(["the cat sat on a red mat"], ["the cat sat on the mat"])
    assert 0.5 < result["rouge_l"] < 1.0
    assert 0.0 < result["bleu"] < 100.0


class _FakePeftModel:
    """generate() appends token 5 with the adapter disabled and 7 with it enabled."""

    def __init__(self) -> None:
        import torch

        self.peft_config: dict[str, object] = {}
        self.adapter_on = True
        self.training = True
        self.seen: list[list[list[int]]] = []
        self._param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):  # type: ignore[no-untyped-def]
        return iter([self._param])

    def eval(self) -> None:
        self.training = False

    def train(self, mode: bool = True) -> None:
        self.training = mode

    @contextlib.contextmanager
    def disable_adapter(self):  # type: ignore[no-untyped-def]
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):  # type: ignore[no-untyped-def]
        import torch

        self.seen.append(input_ids.tolist())
        token = 7 if self.adapter_on else 5
        new = torch.full((input_ids.shape[0], max_new_tokens), token)
        return torch.cat([input_ids, new], dim=1)


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 1

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def test_untuned_answers_come_from_the_model_with_its_adapter_disabled(tmp_path: Path) -> None:
    held = HeldOut(prompts=[[2, 3], [4]], prompt_texts=["p1", "p2"], references=["5 5", "7 7"])
    model, tokenizer = _FakePeftModel(), _Tokenizer()
    evaluation = GenerationEval(held, max_new_tokens=2)
    evaluation.answer_untuned(model, tokenizer)
    metrics = evaluation.answer_tuned(model, tokenizer, tmp_path)

    assert model.seen[0] == [[2, 3], [0, 4]]  # batched, left-padded with the pad id
    assert model.training  # put back in training mode
    assert evaluation.baseline_answers == ["5 5", "5 5"]
    assert metrics["baseline_generation_rouge_l"] == pytest.approx(0.5)  # right on prompt 1
    assert metrics["generation_rouge_l"] == pytest.approx(0.5)  # right on prompt 2
    assert metrics["generation_examples"] == 2
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows[1] == {
        "prompt": "p2",
        "reference": "7 7",
        "answer": "7 7",
        "baseline_answer": "5 5",
    }
