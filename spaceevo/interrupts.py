"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Inside a
finalizer (a weakref callback or ``__del__``, which SQLAlchemy and Optuna run all the time) it is
printed as "Exception ignored" and dropped, and the command runs on to the end. Within
:func:`recorded_interrupts` every SIGINT is also recorded, and long loops call
:func:`raise_if_interrupted` at safe points, where a dropped interrupt is raised again.
"""

from __future__ import annotations

import signal
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
    signal.signal(signal.SIGINT, _record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _pending = False


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived (one a finalizer swallowed included)."""
    if _pending:
        raise KeyboardInterrupt
