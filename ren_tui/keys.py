"""Keys and focus, shared by the app and its screens.

A text field (Input, TextArea) takes every printable key, so the one-letter screen keys
(``1``-``3``, ``?``, ``q``, a screen's ``s`` or ``g``) type into it while it has focus. The app
binds ``escape`` (a priority binding, enabled only while a text field of a full screen has
focus) to leave the field: focus moves to the screen's main widget, and the field posts
:class:`LeftField`, so a screen can react (the Runs filter clears itself).
"""

from __future__ import annotations

import sys

from textual.binding import Binding
from textual.keys import format_key
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Input


def is_text_field(widget: Widget | None) -> bool:
    """Whether ``widget`` takes printable keys as text (an Input or a TextArea)."""
    if isinstance(widget, Input):
        return True
    # TextArea is only checked for once something imported it (its module is heavy; start-up skips it)
    text_area = sys.modules.get("textual.widgets._text_area")
    return text_area is not None and isinstance(widget, text_area.TextArea)


def main_widget(screen: Screen, field: Widget) -> Widget | None:
    """Where focus goes when ``field`` is left: the widget the screen focuses when it opens
    (its ``AUTO_FOCUS``), else the field's nearest focusable container (Compose's form), else none."""
    if screen.AUTO_FOCUS:
        for widget in screen.query(screen.AUTO_FOCUS):
            if widget.focusable and not is_text_field(widget):
                return widget
    for ancestor in field.ancestors:
        if ancestor is screen:
            break
        if isinstance(ancestor, Widget) and ancestor.focusable:
            return ancestor
    return None


class LeftField(Message):
    """Escape took the focus out of a text field (posted by the field, so it bubbles to its screen)."""

    def __init__(self, field: Widget) -> None:
        super().__init__()
        self.field = field

    @property
    def control(self) -> Widget:
        return self.field


ARROWS = {"left": "←", "right": "→", "up": "↑", "down": "↓"}


def key_name(key: str) -> str:
    """A bound key as people write it: ``/`` for slash, ``[`` for left_square_bracket, ``?``, ``←`` for left
    (``shift+←``); ``space``, ``enter``, ``escape``, ``home`` and other modified keys (``ctrl+s``) as they are."""
    modifiers, plus, base = key.rpartition("+") if len(key) > 1 else ("", "", key)
    if not base:  # a key that ends in "+" (Textual names the plus key "plus": not seen)
        return key
    if base in ARROWS:
        base = ARROWS[base]
    elif len(base) > 1:
        character = format_key(base)  # "/" for slash, but also "⏎" for enter and "esc" for escape
        if len(character) == 1 and character.isascii() and character.isprintable():
            base = character
    return modifiers + plus + base


def binding_keys(binding: Binding) -> str:
    """Every key of ``binding`` by its human name, comma-separated (``K, shift+up``)."""
    return ", ".join(dict.fromkeys(key_name(k.strip()) for k in binding.key.split(",")))
