"""Keep the code quoted in the docs equal to the real files: ``python docs/includes.py``.

A quoted file is a fenced code block directly under a line ``<!-- include: PATH -->``, PATH
relative to the repository root; the block's body is the file's whole text. This script
rewrites every such block from its file; docs/test_docs.py fails when one is stale.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = Path(__file__).resolve().parent
INCLUDE = re.compile(r"(?P<head><!-- include: (?P<path>\S+) -->\n```\w*\n)(?P<body>.*?)(?P<tail>```\n)", re.S)


def includes(text: str) -> list[tuple[str, str]]:
    """(path, quoted body) of every include in a page."""
    return [(m["path"], m["body"]) for m in INCLUDE.finditer(text)]


def render(text: str) -> str:
    """The page with every include's body replaced by its file's current text."""
    return INCLUDE.sub(lambda m: m["head"] + (ROOT / m["path"]).read_text(encoding="utf-8") + m["tail"], text)


if __name__ == "__main__":
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        if render(text) != text:
            page.write_text(render(text), encoding="utf-8")
            print(f"updated {page.relative_to(ROOT)}")
