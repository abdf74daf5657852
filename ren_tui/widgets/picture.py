"""Pictures in the terminal, drawn by textual-image: kitty's graphics protocol, sixel, or coloured half-block
characters (``▀`` with a foreground and a background colour: two pixels a cell), which every colour terminal
shows, over plain SSH too; under ``NO_COLOR``, shades of grey (``█▓▒░``).

textual-image, when imported, asks the terminal what it supports (it writes escape sequences and reads the
answers from stdin), and its widget module measures a cell in pixels, the same way when the kernel does not
know. That only works before Textual starts: in a running app, Textual's input thread reads stdin too, so the
answers reach the app as keys typed (a ``c`` from the answer to "which device are you?"), or each question
waits out its timeout. ren-tui imports textual-image only when a screen first shows a picture (start-up
stays quick), so it never lets it ask:

- the way to draw is chosen from the environment (:func:`choose_renderer`): ``REN_TUI_IMAGES``, else what
  the terminal says it is (kitty, WezTerm, iTerm2, foot, Konsole), else half-block characters, which is
  what plain SSH gets (terminals name themselves in variables that SSH does not pass on, but for ``TERM``);
- a cell's size in pixels comes from the kernel (``TIOCGWINSZ``, no question on the wire), else 10x20
  (textual-image's own fallback), and is handed to textual-image before its widgets measure anything;
- textual-image is imported with ``sys.__stdout__`` briefly not a terminal, the case in which it asks
  nothing (:func:`image_class`).
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from textual.widget import Widget

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ENV = "REN_TUI_IMAGES"
RENDERERS = {  # name (REN_TUI_IMAGES) -> how it is said on screen
    "kitty": "kitty graphics",
    "sixel": "sixel",
    "halfblock": "half-block characters",
    "shades": "shades of grey",
}
DEFAULT_CELL = (10, 20)  # pixels: a VT340's cell, textual-image's own guess when nothing says
SIXEL_PROGRAMS = ("WezTerm", "iTerm.app")  # TERM_PROGRAM of terminals that draw sixel (textual-image's README)

_import_lock = threading.Lock()


def choose_renderer(environ: Mapping[str, str] | None = None) -> str:
    """How pictures are drawn here: ``REN_TUI_IMAGES`` when it names a renderer; else ``halfblock`` inside
    tmux or screen (they pass neither protocol on without configuration); ``kitty`` in kitty (``TERM`` is
    ``xterm-kitty`` over ``kitten ssh`` too); ``sixel`` in WezTerm, iTerm2 (whose ``LC_TERMINAL`` crosses
    SSH), foot and Konsole; else ``halfblock`` (``shades`` under ``NO_COLOR``)."""
    env = os.environ if environ is None else environ
    asked = env.get(ENV, "").strip().lower()
    if asked in RENDERERS:
        return asked
    term = env.get("TERM", "")
    fallback = "shades" if env.get("NO_COLOR") else "halfblock"
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return fallback
    if term == "xterm-kitty" or env.get("KITTY_WINDOW_ID"):
        return "kitty"
    if (env.get("TERM_PROGRAM") in SIXEL_PROGRAMS or env.get("LC_TERMINAL") == "iTerm2"
            or term.startswith("foot") or env.get("KONSOLE_VERSION")):
        return "sixel"
    return fallback


def cell_size() -> tuple[int, int]:
    """A terminal cell's width and height in pixels, as the kernel knows them (the terminal, or SSH, tells it
    with the window size); :data:`DEFAULT_CELL` when it does not."""
    try:
        import fcntl
        import struct
        import termios
    except ImportError:  # not a POSIX system
        return DEFAULT_CELL
    for stream in (sys.__stdout__, sys.__stderr__, sys.__stdin__):
        try:
            fd = stream.fileno()  # type: ignore[union-attr]
            if not os.isatty(fd):
                continue
            rows, columns, width, height = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
        except (AttributeError, OSError, ValueError):
            continue
        if rows and columns and width and height:
            return max(width // columns, 1), max(height // rows, 1)
    return DEFAULT_CELL


def image_class(renderer: str, cell: tuple[int, int]) -> type[Widget]:
    """textual-image's widget class that draws with ``renderer`` (a :data:`RENDERERS` name), for cells of
    ``cell`` pixels. Imports textual-image the first time (a tenth of a second, numpy's import: call it from
    a worker thread) without letting it talk to the terminal (see the module's doc)."""
    if renderer not in RENDERERS:
        raise ValueError(f"unknown renderer {renderer!r}; one of {', '.join(RENDERERS)}")
    with _import_lock:
        # The slow imports first, outside the moment stdout is swapped: none of them talks to the terminal.
        from textual_image import _pixeldata, _sixel, _terminal  # noqa: F401

        # get_cell_size() answers from this once set; the widget module calls it at import, widgets when sized.
        _terminal.get_cell_size._result = _terminal.CellSize(*cell)  # type: ignore[attr-defined]
        if "textual_image.widget" not in sys.modules:
            stdout = sys.__stdout__
            sys.__stdout__ = io.StringIO()  # not a terminal: textual_image.renderable asks it nothing
            try:
                import textual_image.widget  # noqa: F401
            finally:
                sys.__stdout__ = stdout
    from textual_image import widget

    return {"kitty": widget.TGPImage, "sixel": widget.SixelImage, "halfblock": widget.HalfcellImage,
            "shades": widget.UnicodeImage}[renderer]


def open_picture(path: Path) -> PILImage:
    """The picture in ``path``, decoded into memory (the file may go: the widget draws it again on every
    resize). Raises OSError (a missing or unreadable file) or ValueError."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")
