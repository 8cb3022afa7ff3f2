"""Console output shared by the commands: consoles, styled messages, tables, byte and duration formats.

Paths, prompts, captions, recipe descriptions and error messages are user data, and rich would
read ``[dev]`` or ``[/]`` in them as console markup (dropping the text, or raising a MarkupError).
So flowtune never lets rich parse markup in what it prints:

- :func:`make_console` makes consoles with markup, emoji codes and highlighting off: a plain
  string prints exactly as it is.
- Styles are applied explicitly to :class:`rich.text.Text` pieces (:func:`styled`, :func:`ok_text`,
  :func:`warning_text`, :func:`error_text`), and tables and progress columns are built from ``Text``
  (:class:`PlainTable`, :func:`key_value_table`, :func:`text_column`), so they print user data
  as-is on any console, including one a caller made with markup on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import TextColumn
from rich.table import Table
from rich.text import Text


def make_console(*, stderr: bool = False, **options: Any) -> Console:
    """A console that prints strings literally (no markup, emoji codes or highlighting).

    Args:
        stderr: Write to standard error instead of standard output.
        options: Further :class:`rich.console.Console` arguments (``quiet``, ``width``, ...).
    """
    settings: dict[str, Any] = {"markup": False, "emoji": False, "highlight": False, "soft_wrap": True}
    return Console(stderr=stderr, **{**settings, **options})


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text from plain strings and ``(text, style)`` pairs; nothing in them is read as markup."""
    return Text.assemble(*parts)


def ok_text(message: str) -> Text:
    """``✓ message`` with a green tick."""
    return styled(("✓", "green"), " ", message)


def warning_text(message: str) -> Text:
    """``warning: message`` with a yellow label."""
    return styled(("warning:", "yellow"), " ", message)


def error_text(message: str, tag: str = "") -> Text:
    """``error{tag}: message`` with a red label (``tag``: e.g. a process's rank)."""
    return styled((f"error{tag}:", "red"), " ", message)


class PlainTable(Table):
    """A :class:`rich.table.Table` whose string title and cells are plain text, never markup."""

    def __init__(self, *headers: Any, title: str | Text | None = None, **options: Any):
        super().__init__(*headers, title=Text(title) if isinstance(title, str) else title, **options)

    def add_row(self, *renderables: Any, **options: Any) -> None:
        """Add a row; string cells are shown exactly as they are."""
        super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), **options)


def key_value_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    """A two-column table of settings or results; keys and values are printed as they are."""
    table = PlainTable(title=title, show_header=False, title_justify="left", title_style="bold")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def text_column(template: str, style: str = "") -> TextColumn:
    """A progress-bar column showing ``template`` formatted with the task (``{task.description}``,
    ``{task.fields[name]}``) as plain text in ``style``: no markup is read from the fields."""
    return TextColumn(template, style=style, markup=False)


def format_bytes(n: float | None) -> str:
    """``1.5 GiB`` style."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``4.2s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
