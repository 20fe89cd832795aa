"""Where a benchmark's results go: ``<stem>.json`` (everything, for programs) and ``<stem>.md`` (for people).

One helper so that every benchmark writes the pair the same way (trailing newline, the markdown also
printed, one line saying where they went).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(stem: Path, result: Any, markdown: str) -> None:
    """Write ``result`` as ``stem``.json and ``markdown`` as ``stem``.md (folders created), print both names."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
