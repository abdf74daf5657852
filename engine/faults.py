"""Named crash points for the reliability tests: ``REN_FAULT=POINT=ACTION[,POINT=ACTION...]``.

The queue's processes call :func:`at` at each transition they make (``worker:marked-running``,
``runner:claimed``, ...). With the variable unset, which is how ren always runs outside the tests,
:func:`at` does nothing. ACTION is ``kill`` (SIGKILL this process there), ``raise`` (a RuntimeError
there) or ``sigint`` (Ctrl-C to this process there). With ``REN_FAULT_DIR`` set, each point fires
once: the first process to reach it creates ``$REN_FAULT_DIR/POINT`` and acts, later ones pass.
"""

from __future__ import annotations

import os
import signal

ENV = "REN_FAULT"
ONCE_ENV = "REN_FAULT_DIR"
ACTIONS = ("kill", "raise", "sigint")


def at(point: str) -> None:
    """Act as ``$REN_FAULT`` says for ``point``, if it names it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        if name != point:
            continue
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r} names no action; expected one of {', '.join(ACTIONS)}.")
        if not _first_time(point):
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise RuntimeError(f"fault injected at {point} ({ENV})")


def _first_time(point: str) -> bool:
    directory = os.environ.get(ONCE_ENV)
    if not directory:
        return True
    try:
        os.close(os.open(os.path.join(directory, point.replace(":", "_")), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
