"""SIGTERM as an exception, raised where it is safe (layer 0: imports nothing internal).

A scheduler pre-empts a job by sending SIGTERM to its whole process group. The command line turns the signal into
:class:`Terminated` in the main process (:func:`handle`); files being written are then discarded by their atomic
writers. Code that runs worker processes wraps its loop in :func:`deferred`: there the signal only sets a flag and
:func:`check`, called between batches, raises it, so that the exception never surfaces in the middle of starting or
stopping workers (a signal can be delivered to any thread of the process, and the main thread then raises it at
its next Python instruction, wherever that is). Forked worker processes inherit the handler and ignore the signal:
the main process stops them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["Terminated", "check", "deferred", "handle"]


class Terminated(BaseException):
    """SIGTERM (``kill``, a scheduler's pre-emption). A ``BaseException``, so no ``except Exception`` swallows it."""


_state = {"main_pid": os.getpid(), "deferred": 0, "pending": False}


def handle(signum: int, frame: object) -> None:
    """The SIGTERM handler the command line installs (its process becomes the main process)."""
    if os.getpid() != _state["main_pid"]:  # a forked worker: the main process stops it
        return
    if _state["deferred"]:
        _state["pending"] = True
        return
    raise Terminated(signum)


def set_main_process() -> None:
    """Make the calling process the one that raises :class:`Terminated`; clears a pending request."""
    _state.update(main_pid=os.getpid(), deferred=0, pending=False)


def check() -> None:
    """Raise :class:`Terminated` now if SIGTERM arrived during a :func:`deferred` block."""
    if _state["pending"] and os.getpid() == _state["main_pid"]:
        _state["pending"] = False
        raise Terminated()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: SIGTERM is remembered and raised by :func:`check` (or at the block's end)."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
    check()
