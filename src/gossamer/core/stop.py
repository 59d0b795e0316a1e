"""A stop asked for from outside a run (a signal handler, another thread)."""

from __future__ import annotations

import threading

__all__ = ["StopRequest"]


class StopRequest(threading.Event):
    """A stop asked for from outside a run (a signal handler, another thread): set, the run
    pauses after the step under way with a checkpoint of it. ``accepted`` says whether the run
    takes it so now: from its first step on. Before it (setting up: a resume, a swarm to join,
    a download) there is nothing to checkpoint, and the asker stops it at once instead."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = False
