"""The dataset pipeline: load -> detect -> validate -> clean -> tokenize -> split -> datasets.

`prepare_dataset` is what a run (and `finetune validate`) calls before loading any model. It
collects every problem before failing, so one DatasetError lists all of them (first examples
of each kind, with line numbers, and counts).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.config import (
    PREFERENCE_OBJECTIVES,
    DatasetSpec,
    Objective,
    SplitSpec,
    TaskType,
)
from finetune_trainer.data.formats import check_record, detect_format, unused_fields
from finetune_trainer.data.labels import (
    LabelMapper,
    check_label_balance,
    label_set,
    map_labels,
)
from finetune_trainer.data.loading import load_records, load_source
from finetune_trainer.data.pairs import PairTokens, pair_stats, render_pair, split_pairs
from finetune_trainer.data.records import Origin, RawDataset
from finetune_trainer.data.report import DatasetError, ValidationReport
from finetune_trainer.data.split import ratio_split
from finetune_trainer.data.stats import SplitStats, TokenStats
from finetune_trainer.data.templates import (
    ChatRenderer,
    Rendered,
    TemplateError,
    render_alpaca,
    render_completion,
    render_text,
)
from finetune_trainer.data.tokenize import tokenize_rendered, tokenize_texts

BOUNDARY_FORMATS = ("alpaca", "chat", "completion")
CHAT_TEMPLATE_FORMATS = ("chat", "preference")


@dataclass
class PreparedDataset:
    """Tokenized splits ready for a trainer, plus what was detected, checked and counted.

    Causal LM splits have columns ``input_ids`` (ends with eos unless truncated) and
    ``completion_mask`` (1 on the tokens the loss counts). Sequence classification splits have
    ``input_ids``, ``attention_mask`` and ``labels`` (ids into ``label_names``). Preference
    splits have ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (the answers end with eos
    unless truncated), what TRL's preference trainers take.
    """

    train: Any
    eval: Any | None
    test: Any | None
    format: str
    label_names: list[str] | None
    report: ValidationReport
    stats: TokenStats
    completion_only_loss: bool = False

    def estimated_trained_tokens(self, epochs: float) -> int:
        """Tokens the run will process: training tokens x epochs."""
        return self.stats.estimated_trained_tokens(epochs)


@dataclass
class _Part:
    """One split's examples while they move through the pipeline."""

    name: str
    records: list[Any] = field(default_factory=list)
    origins: list[Origin] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    input_ids: list[list[int]] = field(default_factory=list)
    masks: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    pairs: list[PairTokens] = field(default_factory=list)  # preference: prompt/chosen/rejected

    def take(self, indices: list[int], name: str) -> _Part:
        def pick(values: list[Any]) -> list[Any]:
            return [values[i] for i in indices] if values else []

        return _Part(
            name,
            pick(self.records),
            pick(self.origins),
            pick(self.keys),
            pick(self.input_ids),
            pick(self.masks),
            pick(self.labels),
            pick(self.pairs),
        )

    def __len__(self) -> int:
        return len(self.records)

    def concat(self, other: _Part) -> _Part:
        """This part's examples followed by `other`'s, under this part's name."""
        return _Part(
            self.name,
            self.records + other.records,
            self.origins + other.origins,
            self.keys + other.keys,
            self.input_ids + other.input_ids,
            self.masks + other.masks,
            self.labels + other.labels,
            self.pairs + other.pairs,
        )


class _Pipeline:
    def __init__(
        self, spec: DatasetSpec, task: TaskType, tokenizer: Any, seed: int, objective: Objective
    ) -> None:
        self.spec = spec
        self.task = task
        self.objective = objective
        self.tokenizer = tokenizer
        self.seed = seed
        self.report = ValidationReport(spec.source or "dataset.inline")
        self.stats = TokenStats(max_seq_length=spec.max_seq_length)
        self.format = ""
        self.completion_only = False
        self.renderer: ChatRenderer | None = None
        self.label_names: list[str] | None = None

    # -- loading ------------------------------------------------------------------------------
    def _absorb(self, raw: RawDataset, role: str) -> None:
        self.report.count_source(role, raw.source, len(raw) + len(raw.errors))
        for issue in raw.errors:
            self.report.add_issue(issue)

    def _load(self, source: str | None, role: str = "train") -> RawDataset | None:
        try:
            raw = load_records(self.spec) if source is None else load_source(source)
        except DatasetError as exc:
            for group in exc.report.groups.values():
                for issue in group.examples:
                    self.report.add_issue(issue, severity=group.severity)
            return None
        self._absorb(raw, role)
        if not raw.records and not raw.errors:
            self.report.add("source", f"{raw.source} holds no records")
        return raw

    # -- format and settings ------------------------------------------------------------------
    def _decide_format(self, raw: RawDataset) -> None:
        spec = self.spec
        if spec.format != "auto":
            fmt: str | None = spec.format
            reason = "set in dataset.format"
        else:
            fmt, reason = detect_format(raw.records, self.task)
        if fmt is None:
            self.report.add("unknown_format", reason)
            raise DatasetError(self.report)
        self.format = fmt
        self.report.format, self.report.format_reason = fmt, reason
        self._check_objective()
        extra = unused_fields(raw.records, fmt)
        if extra:
            listed = ", ".join(f"{k} ({n} records)" for k, n in extra.most_common(8))
            self.report.note(f"fields not used by the {fmt} format are ignored: {listed}")
        if fmt == "classification":
            self.completion_only = False
        elif fmt == "preference":
            self.completion_only = True  # the answers, scored against each other
            if spec.completion_only_loss is False:
                self.report.warn("dataset.completionOnlyLoss is not used by preference data")
        elif spec.completion_only_loss is None:
            self.completion_only = fmt in BOUNDARY_FORMATS
        elif spec.completion_only_loss and fmt not in BOUNDARY_FORMATS:
            self.report.add(
                "settings",
                f"dataset.completionOnlyLoss: {fmt} data has no prompt/completion boundary; "
                "set it to false or use alpaca, chat or completion data",
            )
        else:
            self.completion_only = bool(spec.completion_only_loss)
        if fmt == "preference":
            self.report.note(f"{self.objective} on chosen/rejected answers (prompt not scored)")
        elif fmt != "classification":
            what = "completion/assistant tokens and eos" if self.completion_only else "all tokens"
            self.report.note(f"loss on {what}")
        if spec.template is not None and fmt not in CHAT_TEMPLATE_FORMATS:
            self.report.warn(f"dataset.template is only used by chat data; ignored for {fmt}")
        if spec.system_prompt is not None and fmt not in CHAT_TEMPLATE_FORMATS:
            self.report.warn(f"dataset.systemPrompt is only used by chat data; ignored for {fmt}")
        if fmt == "chat":
            self._setup_chat()

    def _check_objective(self) -> None:
        """Preference data and preference objectives go together (auto-detected formats too)."""
        preference = self.objective in PREFERENCE_OBJECTIVES
        if preference and self.format != "preference":
            self.report.add(
                "settings",
                f"training.objective {self.objective} needs preference data (prompt or messages "
                f"+ chosen + rejected); this data is {self.format} ({self.report.format_reason})",
            )
            raise DatasetError(self.report)
        if not preference and self.format == "preference":
            self.report.add(
                "settings",
                "preference data (chosen + rejected) needs training.objective dpo or orpo; "
                f"training.objective is {self.objective}",
            )
            raise DatasetError(self.report)

    def _setup_chat(self) -> None:
        tok = self.tokenizer
        self.renderer = ChatRenderer(tok, self.spec.template, self.spec.system_prompt)
        self.report.note(f"chat rendered with {self.renderer.description}")
        if self.renderer.is_chatml:
            vocab = tok.get_vocab()
            if "<|im_start|>" not in vocab or "<|im_end|>" not in vocab:
                self.report.warn(
                    "ChatML markers <|im_start|>/<|im_end|> are not tokens of this tokenizer; "
                    "they are tokenized as plain text (add them as special tokens, or set "
                    "dataset.template to a template the model knows)"
                )

    # -- per-record checks --------------------------------------------------------------------
    def _validate(self, raw: RawDataset, name: str) -> _Part:
        part = _Part(name)
        issues: list[Any] = []
        for record, origin in zip(raw.records, raw.origins, strict=True):
            clean = check_record(record, self.format, origin, issues)
            if clean is not None:
                part.records.append(clean)
                part.origins.append(origin)
        for issue in issues:
            self.report.add_issue(issue)
        return self._dedup(part)

    def _dedup(self, part: _Part) -> _Part:
        policy = self.spec.duplicates
        action = "dropped" if policy == "drop" else "kept"
        seen: dict[str, Origin] = {}
        keep: list[int] = []
        keys: list[str] = []
        for i, (record, origin) in enumerate(zip(part.records, part.origins, strict=True)):
            key = json.dumps(record, sort_keys=True, ensure_ascii=False)
            first = seen.get(key)
            if first is not None:
                self.report.add(
                    "duplicate", f"same as {first}", origin, severity="warning", action=action
                )
                self.stats.dropped_duplicates += policy == "drop"
                if policy == "drop":
                    continue
            else:
                seen[key] = origin
            keep.append(i)
            keys.append(key)
        out = part.take(keep, part.name)
        out.keys = keys
        return out

    # -- labels -------------------------------------------------------------------------------
    def _labels(self, parts: list[_Part], source_names: list[str] | None) -> None:
        train = parts[0]
        found = [r["label"] for r in train.records]
        names, origin = label_set(found, self.spec.labels, source_names)
        self.label_names = names
        self.report.note(f"labels from {origin}: {', '.join(names[:20])}")
        mapper = LabelMapper(names, ints_are_ids=bool(self.spec.labels or source_names))
        where = "dataset.labels" if self.spec.labels else "the training data"
        counts: dict[str, dict[str, int]] = {}
        for part in parts:
            ids = map_labels(
                [r["label"] for r in part.records], part.origins, mapper, self.report, where
            )
            keep = [i for i, v in enumerate(ids) if v is not None]
            kept = part.take(keep, part.name)
            part.records, part.origins, part.keys = kept.records, kept.origins, kept.keys
            part.labels = [v for v in ids if v is not None]
            counts[part.name] = check_label_balance(part.labels, names, self.report, part.name)
        self.stats.label_counts = counts

    # -- rendering and tokenization -----------------------------------------------------------
    def _render(self, part: _Part) -> list[Rendered | None]:
        out: list[Rendered | None] = []
        render = {
            "alpaca": render_alpaca,
            "completion": render_completion,
            "text": render_text,
            "classification": render_text,
        }
        for record, origin in zip(part.records, part.origins, strict=True):
            try:
                if self.format == "chat":
                    assert self.renderer is not None
                    out.append(self.renderer.render(record))
                else:
                    out.append(render[self.format](record))
            except TemplateError as exc:
                self.report.add("template_error", str(exc), origin)
                out.append(None)
        return out

    def _tokenize(self, part: _Part) -> None:
        if self.format == "preference":
            self._tokenize_pairs(part)
            return
        rendered = self._render(part)
        keep = [i for i, r in enumerate(rendered) if r is not None]
        if len(keep) < len(part):
            kept = part.take(keep, part.name)
            part.records, part.origins, part.keys = kept.records, kept.origins, kept.keys
        usable = [r for r in rendered if r is not None]
        if self.format == "classification":
            part.input_ids = tokenize_texts(self.tokenizer, [r.text for r in usable])
            part.masks = [[1] * len(ids) for ids in part.input_ids]
        else:
            tokenized = tokenize_rendered(
                self.tokenizer,
                usable,
                add_special_tokens=self.format != "chat",
                completion_only=self.completion_only,
                add_eos=self.tokenizer.eos_token_id is not None,
            )
            part.input_ids, part.masks = tokenized.input_ids, tokenized.masks
        self._apply_length_policy(part, usable)

    def _tokenize_pairs(self, part: _Part) -> None:
        """Render and tokenize each pair, split it into prompt/chosen/rejected token ids, and
        apply dataset.overlong to the longer of prompt + chosen and prompt + rejected."""
        if self.renderer is None and any("messages" in r for r in part.records):
            self._setup_chat()  # the chat variant: a message history, not a prompt text
        rendered: list[tuple[Rendered, Rendered, bool] | None] = []
        for record, origin in zip(part.records, part.origins, strict=True):
            try:
                rendered.append(render_pair(record, self.renderer))
            except TemplateError as exc:
                self.report.add("template_error", str(exc), origin)
                rendered.append(None)
        keep = [i for i, r in enumerate(rendered) if r is not None]
        pairs = split_pairs(self.tokenizer, [r for r in rendered if r is not None])
        kept = part.take(keep, part.name)
        part.records, part.origins, part.keys = kept.records, kept.origins, kept.keys
        usable: list[PairTokens] = []
        limit = self.spec.max_seq_length
        keep = []
        for i, (pair, origin) in enumerate(zip(pairs, part.origins, strict=True)):
            if pair is None:
                self.report.add(
                    "template_error", "the answers could not be told apart from the prompt", origin
                )
                continue
            if pair.length > limit:
                message = (
                    f"{pair.length} tokens (prompt {len(pair.prompt)} + the longer answer) > "
                    f"maxSeqLength {limit}"
                )
                if self._refused_overlong(message, origin):
                    continue
                if len(pair.prompt) >= limit:
                    self.report.add(
                        "prompt_too_long",
                        f"the prompt has {len(pair.prompt)} tokens: with maxSeqLength {limit} "
                        "no token of either answer fits",
                        origin,
                        severity="warning",
                        action="dropped",
                    )
                    self.stats.dropped_no_loss += 1
                    continue
                pair = pair.truncated(limit)
                self.report.add("overlong", message, origin, severity="warning", action="truncated")
                self.stats.truncated += 1
                if pair.chosen == pair.rejected:
                    self.report.add(
                        "identical_answers",
                        f"chosen and rejected are the same in their first {limit - len(pair.prompt)}"
                        " tokens: after truncation the pair expresses no preference",
                        origin,
                        severity="warning",
                        action="dropped",
                    )
                    self.stats.dropped_no_loss += 1
                    continue
            keep.append(i)
            usable.append(pair)
        kept = part.take(keep, part.name)
        part.records, part.origins, part.keys = kept.records, kept.origins, kept.keys
        part.pairs = usable

    def _refused_overlong(self, message: str, origin: Origin) -> bool:
        """dataset.overlong for a record over maxSeqLength: True when it is not kept (error,
        or drop: reported here); False when the caller truncates it."""
        if self.spec.overlong == "error":
            self.report.add("overlong", message, origin)
            return True
        if self.spec.overlong == "drop":
            self.report.add("overlong", message, origin, severity="warning", action="dropped")
            self.stats.dropped_overlong += 1
            return True
        return False

    def _apply_length_policy(self, part: _Part, rendered: list[Rendered]) -> None:
        limit = self.spec.max_seq_length
        keep: list[int] = []
        retokenize: list[int] = []
        for i, (ids, mask, origin) in enumerate(
            zip(part.input_ids, part.masks, part.origins, strict=True)
        ):
            if len(ids) > limit:
                message = f"{len(ids)} tokens > maxSeqLength {limit}"
                if self._refused_overlong(message, origin):
                    continue
                self.report.add("overlong", message, origin, severity="warning", action="truncated")
                self.stats.truncated += 1
                if self.format == "classification":
                    retokenize.append(i)
                else:
                    part.input_ids[i], part.masks[i] = ids[:limit], mask[:limit]
                    mask = part.masks[i]
            if self.completion_only and not any(mask):
                self.report.add(
                    "no_loss_tokens",
                    "the prompt fills maxSeqLength; nothing of the response is left to learn",
                    origin,
                    severity="warning",
                    action="dropped",
                )
                self.stats.dropped_no_loss += 1
                continue
            keep.append(i)
        if retokenize:
            texts = [rendered[i].text for i in retokenize]
            for i, ids in zip(
                retokenize, tokenize_texts(self.tokenizer, texts, limit), strict=True
            ):
                part.input_ids[i] = ids
                part.masks[i] = [1] * len(ids)
        if len(keep) < len(part):
            kept = part.take(keep, part.name)
            part.records, part.origins, part.keys = kept.records, kept.origins, kept.keys
            part.input_ids, part.masks, part.labels = kept.input_ids, kept.masks, kept.labels

    # -- mixing other sources into training -----------------------------------------------------
    def _load_mixes(self) -> list[_Part]:
        """Each `dataset.mix` source, read and checked in the dataset's format."""
        out = []
        for i, mix in enumerate(self.spec.mix or []):
            raw = self._load(mix.source, f"mix[{i}]")
            out.append(self._validate(raw, f"mix[{i}]") if raw is not None else _Part("mix"))
        return out

    def _mix_in(self, train: _Part, mixes: list[_Part], held_out: list[_Part]) -> _Part:
        """Add a seeded sample of each mix source to the training split: `fraction` x the
        training examples, leaving out records the training or evaluation data already has."""
        base = len(train)
        seen = set(train.keys).union(*(p.keys for p in held_out))
        for i, (mix, part) in enumerate(zip(self.spec.mix or [], mixes, strict=True)):
            where = f"dataset.mix[{i}]"
            fresh = [j for j, key in enumerate(part.keys) if key not in seen]
            if len(fresh) < len(part):
                self.report.note(
                    f"{where}: {len(part) - len(fresh)} records of {mix.source} are already in "
                    "the training or evaluation data; not mixed in"
                )
            want = round(mix.fraction * base)
            if want > len(fresh):
                self.report.warn(
                    f"{where}: {want} records asked for (fraction {mix.fraction} of {base} "
                    f"training examples), {mix.source} has {len(fresh)} usable; all are used"
                )
            picked = sorted(random.Random(self.seed + i).sample(fresh, min(want, len(fresh))))
            self.report.note(f"{where}: {len(picked)} records of {mix.source} mixed in")
            sample = part.take(picked, train.name)
            seen.update(sample.keys)
            train = train.concat(sample)
        return train

    # -- the whole thing ----------------------------------------------------------------------
    def run(self) -> PreparedDataset:
        spec = self.spec
        raw = self._load(None)
        if raw is None or not raw.records:
            raise DatasetError(self.report)
        self._decide_format(raw)
        parts = [self._validate(raw, "train")]
        mixes = self._load_mixes()
        held: dict[str, SplitSpec] = {}
        for name, split in (("validation", spec.validation), ("test", spec.test)):
            if split is None:
                continue
            if split.source is None:
                held[name] = split
                continue
            other = self._load(split.source, name)
            if other is not None:
                parts.append(self._validate(other, name))
        if self.format == "classification":
            self._labels(parts, raw.label_names)
        for part in parts + mixes:
            self._tokenize(part)
        self._check_leaks(parts)
        if not self.report.ok:
            raise DatasetError(self.report)
        train = parts[0]
        by_name = {p.name: p for p in parts[1:]}
        if held:
            v = held.get("validation")
            t = held.get("test")
            train_idx, val_idx, test_idx = ratio_split(
                len(train),
                validation=v.split_ratio if v else None,
                test=t.split_ratio if t else None,
                seed=self.seed,
                report=self.report,
            )
            if v:
                by_name["validation"] = train.take(val_idx, "validation")
            if t:
                by_name["test"] = train.take(test_idx, "test")
            train = train.take(train_idx, "train")
        elif not len(train):
            self.report.add("split", "no usable training examples are left")
            raise DatasetError(self.report)
        if mixes:
            train = self._mix_in(train, mixes, list(by_name.values()))
        for name, part in by_name.items():
            if not len(part):
                self.report.add("split", f"dataset.{name}: no usable examples are left")
        if not self.report.ok:
            raise DatasetError(self.report)
        ordered = [train, *(by_name[n] for n in ("validation", "test") if n in by_name)]
        for part in ordered:
            if self.format == "preference":
                self.stats.splits[part.name] = pair_stats(part.pairs)
                continue
            lengths = [len(ids) for ids in part.input_ids]
            in_loss = (
                [0] * len(lengths)
                if self.format == "classification"
                else [sum(m) for m in part.masks]
            )
            self.stats.splits[part.name] = SplitStats.of(lengths, in_loss)
        if self.label_names is not None and held:
            names = self.label_names
            self.stats.label_counts = {
                p.name: {n: p.labels.count(i) for i, n in enumerate(names)} for p in ordered
            }
        if self.renderer is not None and self.renderer.non_incremental:
            self.report.warn(
                f"the chat template rewrites earlier turns for {self.renderer.non_incremental} "
                "assistant turns; for those only the assistant content (not its end-of-turn "
                "marker) is in the loss"
            )
        self.report.stats = self.stats
        datasets = {p.name: self._build(p) for p in ordered}
        return PreparedDataset(
            train=datasets["train"],
            eval=datasets.get("validation"),
            test=datasets.get("test"),
            format=self.format,
            label_names=self.label_names,
            report=self.report,
            stats=self.stats,
            completion_only_loss=self.completion_only,
        )

    def _check_leaks(self, parts: list[_Part]) -> None:
        if len(parts) < 2:
            return
        train_keys = dict(zip(parts[0].keys, parts[0].origins, strict=True))
        for part in parts[1:]:
            leaks = [
                (origin, train_keys[key])
                for key, origin in zip(part.keys, part.origins, strict=True)
                if key in train_keys
            ]
            if leaks:
                origin, first = leaks[0]
                self.report.warn(
                    f"{len(leaks)} {part.name} records also appear in the training data "
                    f"(e.g. {origin} = {first}); evaluation on them overstates quality"
                )

    def _build(self, part: _Part) -> Any:
        from datasets import Dataset

        if self.format == "preference":
            return Dataset.from_dict(
                {
                    "prompt_ids": [p.prompt for p in part.pairs],
                    "chosen_ids": [p.chosen for p in part.pairs],
                    "rejected_ids": [p.rejected for p in part.pairs],
                }
            )
        if self.format == "classification":
            return Dataset.from_dict(
                {
                    "input_ids": part.input_ids,
                    "attention_mask": part.masks,
                    "labels": part.labels,
                }
            )
        return Dataset.from_dict({"input_ids": part.input_ids, "completion_mask": part.masks})


def prepare_dataset(
    spec: DatasetSpec,
    task: TaskType,
    tokenizer: Any,
    *,
    seed: int,
    objective: Objective = "sft",
) -> PreparedDataset:
    """Load, check, clean, tokenize and split the dataset of a run (`objective` dpo and orpo
    need preference data, sft any other format).

    Raises DatasetError (exit code 65, never retried) listing every hard problem found; a
    source that cannot be reached is a TransientError (retryable).
    """
    return _Pipeline(spec, task, tokenizer, seed, objective).run()
