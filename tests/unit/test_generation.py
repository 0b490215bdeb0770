"""Generation eval helpers: prompt/reference split, language-neutral tokens, scores."""

from __future__ import annotations

import pytest
from finetune_trainer.generation import score, split_prompt, tokens


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
