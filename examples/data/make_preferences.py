"""Derive examples/data/preferences.jsonl from examples/data/instructions.jsonl.

Each instruction record becomes one chat-variant preference pair: the user turn is the
instruction and its input, `chosen` is the record's reference answer, and `rejected` is the
reference answer of the next record with the same instruction (file order, wrapping around),
i.e. a well-formed answer to a different input: right format, wrong content. No model wrote
any of it. Run from the repository root: python examples/data/make_preferences.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    records = [json.loads(line) for line in (HERE / "instructions.jsonl").read_text().splitlines()]
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_task[record["instruction"]].append(i)
    lines = []
    for i, record in enumerate(records):
        group = by_task[record["instruction"]]
        k = group.index(i)
        others = group[k + 1 :] + group[:k]
        rejected = next(
            records[j]["output"] for j in others if records[j]["output"] != record["output"]
        )
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        pair = {
            "messages": [{"role": "user", "content": user}],
            "chosen": record["output"],
            "rejected": rejected,
        }
        lines.append(json.dumps(pair, ensure_ascii=False))
    (HERE / "preferences.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
