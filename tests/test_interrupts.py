"""Stopping cleanly (training/interrupts.py): a Ctrl-C or SIGTERM inside a deferred block lands at its end.

Real signals sent to this process; each test checks the block ran to its end before the interrupt.
"""
import os
import signal

import pytest

from training import interrupts


def test_a_ctrl_c_inside_a_deferred_block_is_raised_when_the_block_ends():
    before = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append("after the signal")  # still inside: the interrupt waits
    assert finished == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_takes_the_ctrl_c_path_and_is_deferred_too():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.sigterm_interrupts():
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append("after the signal")
    assert finished == ["after the signal"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_quiet_block_raises_nothing_and_restores_the_handlers():
    handlers = [signal.getsignal(s) for s in interrupts.STOP_SIGNALS]
    with interrupts.deferred():
        pass
    assert [signal.getsignal(s) for s in interrupts.STOP_SIGNALS] == handlers
