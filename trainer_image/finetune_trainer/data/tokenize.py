"""Tokenize rendered examples into input_ids and a completion mask.

The whole text is tokenized once (so it tokenizes exactly as it would at inference) and the
character positions of the tokens decide whether the loss counts them: a token counts when it
overlaps a completion span (a token straddling the boundary counts). Tokenizers without offsets (slow, Python ones) are handled by
tokenizing the prompt and completion segments separately and concatenating.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.data.templates import Rendered, Span

BATCH = 1000


@dataclass
class Tokenized:
    """Token ids and loss masks, one list per example, in the order given."""

    input_ids: list[list[int]] = field(default_factory=list)
    masks: list[list[int]] = field(default_factory=list)


def _mask(offsets: Sequence[tuple[int, int]], spans: list[Span]) -> list[int]:
    if len(spans) == 1:
        s, e = spans[0]
        return [1 if (b > s and a < e) else 0 for a, b in offsets]
    return [1 if any(b > s and a < e for s, e in spans) else 0 for a, b in offsets]


def _rust_backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a fast tokenizer, when calling it directly is safe.

    One ordinary call first lets transformers reset truncation, padding and special-token
    handling on the backend; a backend that still truncates or pads is not used directly.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    tokenizer(["x"], add_special_tokens=False, verbose=False)
    if getattr(backend, "truncation", None) is not None:
        return None
    if getattr(backend, "padding", None) is not None:
        return None
    return backend


def _mask_from_encoding(encoding: Any, spans: list[Span]) -> list[int]:
    """Completion mask from character spans in O(spans) lookups (char_to_token).

    Tokens containing the first and last character of a span and all tokens between count;
    when a character maps to no token (a normalizer dropped it) fall back to the offsets.
    """
    n = len(encoding.ids)
    mask = [0] * n
    for s, e in spans:
        if e <= s:
            continue
        first = encoding.char_to_token(s)
        last = encoding.char_to_token(e - 1)
        if first is None or last is None:
            return _mask(encoding.offsets, spans)
        mask[first : last + 1] = [1] * (last + 1 - first)
    return mask


def tokenize_rendered(
    tokenizer: Any,
    rendered: list[Rendered],
    *,
    add_special_tokens: bool,
    completion_only: bool,
    add_eos: bool = True,
) -> Tokenized:
    """Tokenize `rendered`; mask = 1 on completion tokens (all ones if not completion_only).

    The eos token is appended when the sequence does not already end with it; it counts for the
    loss when the completion runs to the end of the text (or always, without completion_only).
    """
    eos = tokenizer.eos_token_id if add_eos else None
    out = Tokenized()
    backend = _rust_backend(tokenizer) if getattr(tokenizer, "is_fast", False) else None
    for start in range(0, len(rendered), BATCH):
        chunk = rendered[start : start + BATCH]
        texts = [r.text for r in chunk]
        if backend is not None:
            encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            all_ids: list[list[int]] = [enc.ids for enc in encodings]
            if completion_only:
                masks = [
                    _mask_from_encoding(enc, r.spans)
                    for enc, r in zip(encodings, chunk, strict=True)
                ]
            else:
                masks = [[1] * len(ids) for ids in all_ids]
        elif getattr(tokenizer, "is_fast", False):
            enc = tokenizer(
                texts,
                add_special_tokens=add_special_tokens,
                return_offsets_mapping=completion_only,
                return_attention_mask=False,
                verbose=False,
            )
            all_ids = enc["input_ids"]
            if completion_only:
                masks = [
                    _mask(offsets, r.spans)
                    for offsets, r in zip(enc["offset_mapping"], chunk, strict=True)
                ]
            else:
                masks = [[1] * len(ids) for ids in all_ids]
        else:
            all_ids, masks = [], []
            for r in chunk:
                ids, mask = _segmented(tokenizer, r, add_special_tokens)
                all_ids.append(ids)
                masks.append(mask if completion_only else [1] * len(ids))
        for ids, mask, r in zip(all_ids, masks, chunk, strict=True):
            ends_in_completion = bool(r.spans) and r.spans[-1][1] >= len(r.text)
            if eos is not None:
                if not ids or ids[-1] != eos:
                    ids.append(eos)
                    mask.append(0)
                if ends_in_completion or not completion_only:
                    mask[-1] = 1
            out.input_ids.append(ids)
            out.masks.append(mask)
    return out


def _segmented(
    tokenizer: Any, r: Rendered, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """Tokenize prompt/completion segments separately (for tokenizers without offsets)."""
    cuts = sorted({0, len(r.text), *(p for span in r.spans for p in span)})
    ids: list[int] = []
    mask: list[int] = []
    for a, b in itertools.pairwise(cuts):
        piece = tokenizer.encode(r.text[a:b], add_special_tokens=False)
        inside = any(s <= a and b <= e for s, e in r.spans)
        ids += piece
        mask += [1 if inside else 0] * len(piece)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_special_tokens and bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [bos, *ids]
        mask = [0, *mask]
    return ids, mask


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int | None = None) -> list[Any]:
    """Plain tokenization with the tokenizer's special tokens (classification inputs)."""
    out: list[Any] = []
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(
            texts[start : start + BATCH],
            add_special_tokens=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_attention_mask=False,
            verbose=False,
        )
        out.extend(enc["input_ids"])
    return out
