"""The key footer, made again only when the keys it shows change."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer as TextualFooter


class Footer(TextualFooter):
    """Textual's footer, which unmounts and mounts a widget per key whenever its screen's bindings are updated:
    on every switch to the screen and every focus change, a few times per switch (tens of milliseconds on a
    slow machine), though the keys shown are most often the same. This one keeps its keys while what it
    would show (each shown binding, enabled or not, its tooltip; compact, the palette key) is unchanged."""

    _shown: tuple | None = None

    def _keys(self) -> tuple:
        bindings = tuple((b.key, b.action, b.description, b.key_display, b.group, enabled, tooltip)
                         for _, b, enabled, tooltip in self.screen.active_bindings.values() if b.show)
        return (bindings, self.compact, self.show_command_palette, self.combine_groups, self.app.app_focus)

    def compose(self) -> ComposeResult:
        self._shown = self._keys() if self._bindings_ready else None
        yield from super().compose()

    def bindings_changed(self, screen: Screen) -> None:
        if self._shown is not None and self.is_attached and screen is self.screen and self._keys() == self._shown:
            return
        super().bindings_changed(screen)
