"""Where a bench's results go: `<out>.md` (the table it printed) and `<out>.json` (its summary)."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path | str, text: str, summary: dict | None = None) -> None:
    """Writes `text` to out.md and, when given, `summary` to out.json, creating the folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    if summary is not None:
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
