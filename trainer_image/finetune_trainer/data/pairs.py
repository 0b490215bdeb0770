"""Preference pairs: render a pair, tokenize it, split it into prompt/chosen/rejected ids.

A pair is rendered twice, prompt + chosen and prompt + rejected (the chat variant through the
chat template, the answer as the last assistant turn; the plain variant verbatim, as the
completion format), and each text is tokenized whole, so the answers tokenize as they would at
inference. The prompt is the longest common token prefix of the two that ends before either
answer starts (a token straddling the boundary belongs to the answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_trainer.data.stats import SplitStats
from finetune_trainer.data.templates import ChatRenderer, Rendered, render_completion
from finetune_trainer.data.tokenize import tokenize_rendered


@dataclass(frozen=True, slots=True)
class PairTokens:
    """One tokenized pair: the shared prompt and the two answers (each ends with eos)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def length(self) -> int:
        """Tokens of the longer sequence, prompt + chosen or prompt + rejected."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    def truncated(self, limit: int) -> PairTokens:
        """The pair with both answers cut so that each sequence fits `limit` tokens."""
        room = limit - len(self.prompt)
        return PairTokens(self.prompt, self.chosen[:room], self.rejected[:room])


def render_pair(
    record: dict[str, Any], renderer: ChatRenderer | None
) -> tuple[Rendered, Rendered, bool]:
    """(prompt + chosen, prompt + rejected, whether it is the chat variant); each rendered
    text's only span is its answer."""
    if "messages" not in record:
        chosen = render_completion({"prompt": record["prompt"], "completion": record["chosen"]})
        rejected = render_completion({"prompt": record["prompt"], "completion": record["rejected"]})
        return chosen, rejected, False
    assert renderer is not None, "the chat variant needs a chat renderer"
    out = []
    for answer in (record["chosen"], record["rejected"]):
        messages = [*record["messages"], {"role": "assistant", "content": answer}]
        rendered = renderer.render({"messages": messages})
        out.append(Rendered(rendered.text, rendered.spans[-1:]))  # earlier turns are prompt
    return out[0], out[1], True


def _prompt_length(
    chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]]
) -> int:
    """Tokens the two sequences share before either answer starts."""
    (c_ids, c_mask), (r_ids, r_mask) = chosen, rejected
    limit = min(c_mask.index(1) if 1 in c_mask else 0, r_mask.index(1) if 1 in r_mask else 0)
    n = 0
    while n < limit and c_ids[n] == r_ids[n]:
        n += 1
    return n


def split_pairs(
    tokenizer: Any, rendered: list[tuple[Rendered, Rendered, bool]]
) -> list[PairTokens | None]:
    """Tokenize rendered pairs (chat texts carry their own special tokens) and split each into
    prompt/chosen/rejected; None for a pair without a prompt or an answer."""
    out: list[PairTokens | None] = [None] * len(rendered)
    eos = tokenizer.eos_token_id is not None
    for chat in (False, True):
        indices = [i for i, r in enumerate(rendered) if r[2] == chat]
        if not indices:
            continue
        texts = [rendered[i][0] for i in indices] + [rendered[i][1] for i in indices]
        tokens = tokenize_rendered(
            tokenizer, texts, add_special_tokens=not chat, completion_only=True, add_eos=eos
        )
        n = len(indices)
        for k, i in enumerate(indices):
            chosen = (tokens.input_ids[k], tokens.masks[k])
            rejected = (tokens.input_ids[n + k], tokens.masks[n + k])
            cut = _prompt_length(chosen, rejected)
            if cut == 0 or cut == len(chosen[0]) or cut == len(rejected[0]):
                continue
            out[i] = PairTokens(chosen[0][:cut], chosen[0][cut:], rejected[0][cut:])
    return out


def pair_stats(pairs: list[PairTokens]) -> SplitStats:
    """Examples are pairs; tokens count both sequences (what a step processes), the loss
    tokens both answers, the lengths the longer sequence of each pair (what maxSeqLength
    bounds)."""
    n = len(pairs)
    return SplitStats(
        examples=n,
        tokens=sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs),
        loss_tokens=sum(len(p.chosen) + len(p.rejected) for p in pairs),
        mean_length=round(sum(p.length for p in pairs) / n, 1) if n else 0.0,
        max_length=max((p.length for p in pairs), default=0),
    )
