"""Small modal dialogs shared by the screens: confirm, and a one-line prompt."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

# A dialog is as wide as its text (a confirm) or 64 cells (a prompt), never wider than 90% of the
# screen; its text wraps inside it, however long a run id makes it.
DIALOG_CSS = """
Confirm, Prompt { align: center middle; }
Confirm > Vertical, Prompt > Vertical {
    height: auto; max-height: 90%; max-width: 90%; padding: 1 2;
    border: thick $primary; background: $surface;
}
Confirm > Vertical { width: auto; min-width: 46; }
Prompt > Vertical { width: 64; }
Confirm Label { width: auto; max-width: 100%; }
Prompt Label { width: 100%; }
Confirm Horizontal { width: 100%; height: auto; margin-top: 1; align-horizontal: right; }
Confirm Button { margin-left: 2; }
Prompt Label.hint { color: $text-muted; }
"""


class Confirm(ModalScreen[bool]):
    """Yes/no; ``y``/``enter`` confirm, ``n``/``escape`` refuse."""

    DEFAULT_CSS = DIALOG_CSS
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("No (n)", id="no")
                yield Button("Yes (y)", id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class Prompt(ModalScreen["str | None"]):
    """One line of text; ``enter`` accepts, ``escape`` cancels (None)."""

    DEFAULT_CSS = DIALOG_CSS
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", hint: str = "") -> None:
        super().__init__()
        self.title_text, self.value, self.hint = title, value, hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text)
            yield Input(self.value, id="answer")
            if self.hint:
                yield Label(self.hint, classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
