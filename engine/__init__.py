"""ren's engine: presets, models, freezing, training and the results store.

Importing this package is cheap: nothing here imports torch until a model or a
training run is actually built, so the CLI's ``--help`` and the TUI stay fast.
"""

__version__ = "0.1.0"
