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


def _rank(rank: int, store: str, out: str) -> None:
    """Rank 1 ends (as if interrupted) while rank 0 waits in an all-reduce; rank 0 writes what it saw."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 1:
        os._exit(0)
    try:
        dist.all_reduce(torch.ones(3))
        seen = "the all-reduce finished"
    except interrupts.STOPPED as error:
        seen = f"{interrupts.counts_as_interrupt(error)} {interrupts.counts_as_interrupt(RuntimeError('mat1 and mat2 shapes'))}"
    with open(out, "w") as f:
        f.write(seen)
    os._exit(0)  # no destroy_process_group: its peer is gone


def test_a_collective_whose_peer_is_gone_counts_as_an_interrupt(tmp_path):
    """Real gloo on 2 processes: a Ctrl-C that ends one rank reaches another blocked in a collective as
    gloo's "Connection closed by peer" RuntimeError, which must take the interrupt's save path (the
    flaky 2-process Ctrl-C test of stop 18); an unrelated RuntimeError must not."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_rank, args=(r, str(tmp_path / "store"), str(tmp_path / "seen"))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert (tmp_path / "seen").read_text() == "True False"
    assert not interrupts.counts_as_interrupt(RuntimeError("Connection closed by peer"))  # one process: no peer to lose
    assert interrupts.counts_as_interrupt(KeyboardInterrupt())
