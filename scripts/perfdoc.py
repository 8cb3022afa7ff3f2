"""Shared by the benchmark scripts: replace one `## ` section of docs/performance.md."""

from __future__ import annotations

from pathlib import Path


def replace_section(document: str, heading: str, section: str) -> str:
    """``document`` with the section starting at the line ``heading`` (up to the next ``## ``
    heading) replaced by ``section``; appended at the end if there is no such section."""
    lines = document.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return (document.rstrip("\n") + "\n\n" if document.strip() else "") + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + rest if rest else "")


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) the section ``heading`` of the file at ``path`` (created if missing)."""
    old = path.read_text() if path.exists() else "# Performance\n"
    path.write_text(replace_section(old, heading, section))
