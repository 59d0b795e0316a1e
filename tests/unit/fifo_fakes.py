"""A fifo for tests of readers that must refuse one, without hanging where they do not."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def fifo_with_a_brief_writer(path: Path, data: bytes = b"") -> Iterator[None]:
    """Make a fifo at ``path``; while the block runs (at most 5 s), a thread writes ``data`` to
    the first reader that opens it and closes it. A reader that should refuse the fifo but
    opens it then reads ``data`` and goes on, so its test fails instead of waiting for ever. A
    reader that opens it only to look at it and closes it again leaves the write a broken pipe,
    which is what a refusal looks like from here, not an error."""
    os.mkfifo(path)
    done = threading.Event()

    def feed() -> None:
        deadline = time.monotonic() + 5
        while not done.is_set() and time.monotonic() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # (ENXIO: no reader has it open yet)
                done.wait(0.01)
                continue
            try:
                os.write(fd, data)
            except BrokenPipeError:
                pass  # the reader opened the fifo to look at it, refused it and closed it: fine
            finally:
                os.close(fd)
            return

    feeder = threading.Thread(target=feed, name="fifo-feeder", daemon=True)
    feeder.start()
    try:
        yield
    finally:
        done.set()
        feeder.join(timeout=5)
