"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Inside a
finalizer (a weakref callback or ``__del__``, which SQLAlchemy and Optuna run all the time) it is
printed as "Exception ignored" and dropped, and the command runs on to the end. Within
:func:`recorded_interrupts` every SIGINT is also recorded, and long loops call
:func:`raise_if_interrupted` at safe points, where a dropped interrupt is raised again; a recorded
interrupt that a finalizer dropped is not printed either (``sys.unraisablehook``): Ctrl-C gives the
command's own message, never a traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_pending = False


def _record(signum: int, frame: object) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextmanager
def recorded_interrupts() -> Iterator[None]:
    """Record SIGINT while the block runs (main thread only; an ignored SIGINT stays ignored)."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pending = False
    previous_hook = sys.unraisablehook

    def unraisable(info: object) -> None:
        if not (_pending and isinstance(getattr(info, "exc_value", None), KeyboardInterrupt)):
            previous_hook(info)  # a recorded interrupt is raised again at the next safe point: not printed

    signal.signal(signal.SIGINT, _record)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
        _pending = False


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived (one a finalizer swallowed included)."""
    if _pending:
        raise KeyboardInterrupt
