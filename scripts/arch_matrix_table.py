"""Render the architectures x methods table from what tests/test_arch_matrix.py actually ran.

    FTKIT_ARCH_MATRIX=docs/arch_matrix.json pytest tests/test_arch_matrix.py
    python scripts/arch_matrix_table.py docs/arch_matrix.json > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ["lora", "qlora", "prefix", "prompt", "freeze"]
HEAD = {"lora": "LoRA (+merge)", "qlora": "QLoRA 4-bit (+merge)", "prefix": "prefix", "prompt": "prompt",
        "freeze": "freeze"}


def cell(entry: dict | None, notes: list[str]) -> str:
    if entry is None:
        return "not run"
    if entry["status"] == "ok":
        return "yes"
    if entry["status"] == "unsupported":
        if entry["reason"] not in notes:
            notes.append(entry["reason"])
        return f"refused (exit 2) [{notes.index(entry['reason']) + 1}]"
    return "**FAILED**"


def table(data: dict) -> str:
    notes: list[str] = []
    rows = ["| architecture | " + " | ".join(HEAD[m] for m in METHODS) + " | `auto` targets |",
            "|---" * (len(METHODS) + 2) + "|"]
    for fam in sorted(data["results"]):
        res = data["results"][fam]
        targets = (res.get("lora", {}).get("checks") or {}).get("targets") or []
        rows.append(f"| {fam} | " + " | ".join(cell(res.get(m), notes) for m in METHODS)
                    + f" | {', '.join(targets)} |")
    v = data.get("versions", {})
    out = "\n".join(rows)
    out += "\n\n" + "\n".join(f"[{i}] {n}" + "  " for i, n in enumerate(notes, 1))
    out += ("\n\nEach \"yes\": 2 SFT steps on a tiny random model of that family (SmolLM2 tokenizer), then "
            "`ftkit generate` on the run dir; LoRA/QLoRA also merged, logit-verified, and decoded "
            "token-for-token identically to base + adapter. "
            f"transformers {v.get('transformers')}, peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}, CPU.")
    return out


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/arch_matrix.json")
    print(table(json.loads(path.read_text(encoding="utf-8"))))
