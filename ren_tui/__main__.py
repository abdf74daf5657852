"""``ren-tui`` (and ``python -m ren_tui``): the workbench, started with the cyclic garbage collector off.

Start-up makes a few hundred thousand objects that live as long as the app (modules, styles, widgets, the
runs), and allocating them sets off collections that walk all of them: about 40 ms on this project's
2-core machine before the first frame with 500 runs. The collector comes back on once start-up is over
(``RenApp.freeze_heap``), with what start-up made moved out of its sight.
"""

from __future__ import annotations

import gc


def main() -> None:
    gc.disable()
    from ren_tui.app import main as run_app

    run_app()


if __name__ == "__main__":
    main()
