"""Stopping a training run cleanly: SIGTERM takes Ctrl-C's path, and an update is never cut in half.

A run interrupted by Ctrl-C (SIGINT) or by a scheduler's/``torchrun``'s SIGTERM saves a checkpoint of
the last *finished* step and exits; ``--resume`` then ends where an uninterrupted run would. That only
holds if the interrupt cannot land between an optimizer step and the step counter (a checkpoint would
name step N while holding step N+1's weights, or half of Adam's update): :func:`deferred` holds the
signal until such a block ends.

On several processes a Ctrl-C reaches every one of them, and a process blocked in a collective may
learn of it first as the collective's failure (its peer, interrupted, closed the connection) rather
than as its own KeyboardInterrupt: :data:`STOPPED` catches both, so the main process still saves.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def counts_as_interrupt(error: BaseException) -> bool:
    """``error`` is Ctrl-C/SIGTERM, or a collective failing because another process of the run has ended
    (gloo: "Connection closed by peer"): the state of the last finished step is intact and worth saving."""
    import torch.distributed as dist

    if isinstance(error, KeyboardInterrupt):
        return True
    if not (isinstance(error, RuntimeError) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        return False
    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(s in text for s in ("closed by peer", "connection reset",
                                                                       "broken pipe", "remote worker"))


# What a training loop catches to save the last finished step (then re-raises): Ctrl-C, SIGTERM (see
# below) and collectives that fail with it (:func:`counts_as_interrupt` tells them from other errors).
STOPPED = (KeyboardInterrupt, RuntimeError)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers can only be set there


@contextmanager
def sigterm_interrupts():
    """Inside the block SIGTERM raises KeyboardInterrupt (checkpoint, then exit 130) instead of killing
    the process outright."""
    if not _on_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred():
    """Holds SIGINT and SIGTERM until the block ends, then delivers the first one that came (so the
    usual KeyboardInterrupt is raised at the end of the block, with the state consistent)."""
    if not _on_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])  # runs the restored handler now
