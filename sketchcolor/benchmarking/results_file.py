"""benchmarks/RESULTS.md is shared by several scripts: each owns one delimited section.

A section runs from ``<!-- BEGIN <owner> -->`` to ``<!-- END <owner> -->``; writing it
replaces that span, or appends it when absent, and leaves everything else as it was. The file
is locked while it is rewritten, so scripts finishing together do not lose each other's sections.
"""
from __future__ import annotations

import fcntl
import re
from pathlib import Path


def write_section(path: Path | str, owner: str, body: str) -> None:
    """Put ``body`` into ``owner``'s section of the Markdown file ``path`` (created if missing)."""
    path = Path(path)
    begin, end = f"<!-- BEGIN {owner} -->", f"<!-- END {owner} -->"
    section = f"{begin}\n{body.strip()}\n{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)
    with open(path, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        text = handle.read()
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _: section, text, count=1)
        else:
            text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
        handle.seek(0)
        handle.truncate()
        handle.write(text)
