"""The queue of a suite's jobs under torchrun: each process takes the next job no process has taken yet."""

from __future__ import annotations

import glob
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from ssdd.distributed import World, barrier, broadcast_object
from ssdd.io import atomic_write_text, locked, process_running


def claimed(jobs: list[tuple], folder: Path, current: World) -> Iterator[tuple]:
    """This process's jobs: the next one not yet taken by any process, until none is left (a counter in
    ``folder``, changed under a lock). Process 0's list is everyone's."""
    if not jobs:
        return
    host = socket.gethostname()
    if current.is_main:  # the counters that killed runs on this machine left (another run may share the folder)
        for stale in folder.glob(f".queue-{glob.escape(host)}-*"):
            if not process_running(int(stale.name.split("-")[-2])):
                stale.unlink(missing_ok=True)
    jobs, name = broadcast_object((jobs, f".queue-{host}-{os.getpid()}-{uuid.uuid4().hex}"), current)
    counter = folder / name
    while True:
        with locked(folder / ".queue.lock"):
            taken = int(counter.read_text()) if counter.exists() else 0
            if taken < len(jobs):
                atomic_write_text(counter, str(taken + 1))
        if taken >= len(jobs):
            break
        yield jobs[taken]
    barrier(current)  # every process has seen the queue empty: the counter may go
    if current.is_main:
        counter.unlink()
