"""Derive examples/data/preferences.jsonl from examples/data/instructions.jsonl.

Each instruction record becomes one chat-variant preference pair: the user turn is the
instruction and its input, `chosen` is the record's reference answer, and `rejected` is the
same answer padded with filler: a stock opening before it and a stock closing after it (one of
four of each, picked by the record's position). The pairs teach a format preference, "answer
without filler"; both answers are correct. No model wrote any of it. Run from the repository
root: python examples/data/make_preferences.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

OPENINGS = (
    "Sure! I'd be happy to help with that.",
    "Great question! Let me work through it for you.",
    "Of course! Here is what you asked for.",
    "Absolutely, I can help you with this one.",
)
CLOSINGS = (
    "I hope this helps! Let me know if you have any other questions.",
    "Feel free to ask if you need anything else!",
    "Let me know if there is anything else I can do for you.",
    "I hope that answers your question. Have a great day!",
)


def main() -> None:
    lines = []
    for i, line in enumerate((HERE / "instructions.jsonl").read_text().splitlines()):
        record = json.loads(line)
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        opening, closing = OPENINGS[i % 4], CLOSINGS[(i // 4) % 4]
        pair = {
            "messages": [{"role": "user", "content": user}],
            "chosen": record["output"],
            "rejected": f"{opening} {record['output']} {closing}",
        }
        lines.append(json.dumps(pair, ensure_ascii=False))
    (HERE / "preferences.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
