"""The workbench's screens; each is imported when first shown."""

from __future__ import annotations

from textual import events


class KeepStyles:
    """For a screen (before ``Screen`` in its bases) that keeps its styles when it comes back to the front.

    Textual restyles every node of a screen it resumes (a mode switched to, the screen under a closed one).
    That redoes what mount and every change since did with the same stylesheet (a theme change refreshes
    all CSS on the next switch instead, ``App.switch_mode``), and it drops the widgets' render caches: the
    Runs table then renders every visible cell again, Compose restyles its ~370 nodes, most of a switch.
    This handler runs before ``Screen``'s, which reads the flag it clears."""

    def _on_screen_resume(self, event: events.ScreenResume) -> None:
        event.refresh_styles = False
