"""A Ctrl-C that lands in a finalizer is not lost (spaceevo.interrupts)."""

import os
import signal

import pytest

from spaceevo.interrupts import raise_if_interrupted, recorded_interrupts


class _InterruptedWhileFinalized:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # its KeyboardInterrupt is raised here, printed and dropped


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, on purpose
def test_a_sigint_swallowed_by_a_finalizer_is_raised_at_the_next_check() -> None:
    with recorded_interrupts():
        raise_if_interrupted()  # nothing pending yet
        finalized = _InterruptedWhileFinalized()
        del finalized  # no exception escapes a finalizer: without the record this Ctrl-C would be lost
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    raise_if_interrupted()  # the record ends with the block
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with recorded_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
