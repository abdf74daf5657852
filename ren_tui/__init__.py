"""ren-tui: the terminal workbench. It reads the results store through
:mod:`engine.store` and never imports torch, transformers or timm, so it starts
fast over SSH."""
