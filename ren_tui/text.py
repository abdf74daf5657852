"""Text from run records (names, notes, tags, errors, logs), made safe to show.

Users and files write it, so it may hold control characters (an ANSI sequence would act on the terminal,
over SSH too) and markup (``"[red]x"`` would restyle a cell, ``"[/red]"`` alone would stop a screen from
drawing). Its control characters are written as escapes (``\\x1b``, engine.display.terminal_safe), and it
is never parsed as markup: DataTable cells (rich markup) get rich's escaping, Textual markup gets it as
``$variables``, which are inserted as plain text.
"""

from __future__ import annotations

from rich.markup import escape
from textual.content import Content

from engine.display import terminal_safe


def safe(text: str, *, lines: bool = False) -> str:
    """``text`` with its control characters escaped, for plain text (an Input, a chart legend, a
    notification without markup); ``lines`` keeps newlines and tabs."""
    return terminal_safe(text, lines=lines)


def cell(text: str) -> str:
    """``text`` as a DataTable cell or column label, which DataTable parses as rich markup."""
    return escape(terminal_safe(text))


def markup(template: str, *, lines: bool = False, **values: str) -> Content:
    """Textual ``template`` markup with each ``$name`` replaced by ``values[name]`` as plain, safe text."""
    return Content.from_markup(template, **{name: safe(value, lines=lines) for name, value in values.items()})
