"""The domain text behind docs/vocabulary.md, written as lorakit data files (prompt/completion JSONL).

    .venv/bin/python docs/vocabulary_data.py [runs/vocabulary/data]

- zh.jsonl: Chinese text: chatterbot-corpus's Chinese conversations (question -> reply) and Debian's
  fortunes-zh (`apt-get install fortunes-zh`: classical sayings, 300 Tang poems, 100 Song lyrics),
  each fortune as its first 8 characters -> the rest; skipped with a note when absent.
- icd10cm.jsonl: every billable ICD-10-CM code (simple-icd-10-cm, the CDC April 2026 release) ->
  its description: the medical vocabulary of the default task's questions, all of it. No prompt
  text repeats, so the token counts are the domain text's own.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from lorakit.data.tasks import chatterbot_pairs

FORTUNES = Path("/usr/share/games/fortunes")
ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def fortunes() -> list[str]:
    records = []
    for name in ("chinese", "tang300", "song100"):
        path = FORTUNES / name
        if path.is_file():
            text = ESCAPE.sub("", path.read_text(encoding="utf-8", errors="replace"))
            records += [r.strip() for r in text.split("\n%\n") if r.strip()]
    return records


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/vocabulary/data")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": q, "completion": a} for q, a in chatterbot_pairs("chinese")]
    found = fortunes()
    rows += [{"prompt": f[:8], "completion": f[8:]} for f in found if len(f) > 12]  # continue the text
    if not found:
        print(
            "fortunes-zh is not installed (apt-get install fortunes-zh): zh.jsonl has the conversations only"
        )
    (out / "zh.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    import simple_icd_10_cm as icd

    codes = [c for c in icd.get_all_codes(True) if icd.is_leaf(c)]
    medical = [{"prompt": c, "completion": icd.get_description(c)} for c in codes]
    (out / "icd10cm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in medical), encoding="utf-8")
    print(
        f"{out}/zh.jsonl: {len(rows)} records ({len(found)} fortunes); {out}/icd10cm.jsonl: {len(medical)} codes"
    )


if __name__ == "__main__":
    main()
