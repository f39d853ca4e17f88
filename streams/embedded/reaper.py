"""Embedded services end with the process that started them, even one killed with SIGKILL.

A killed ``weir up`` used to leave its broker, valkey and PostgreSQL running
(and their memory held) until the next start found them. :class:`Reaper`
starts one small watchdog process and tells it, over a pipe, each service's
pid and the signal that stops it cleanly. The parent holds the pipe's write
end; when the parent exits for any reason, SIGKILL included, the kernel
closes it, the watchdog reads end-of-file, sends each service its signal,
waits up to ``grace`` seconds and then SIGKILLs what is left. A service that
already stopped (the parent's own clean stop) is left alone: the watchdog
checks each pid's start time, so a reused pid is never signalled.

Run as ``python -m streams.embedded.reaper``; it imports nothing of Weir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Protocol

import psutil

GRACE_S = 15.0


class EmbeddedService(Protocol):
    """A service a Weir process starts as a child process."""

    stop_signal: signal.Signals  # what stops it cleanly (SIGTERM, or SIGINT for PostgreSQL's fast shutdown)

    @property
    def pid(self) -> int | None: ...

    def stop(self) -> None: ...


class Reaper:
    """The parent's side: ``watch(pid, sig)`` each service after it starts; ``close()`` after stopping them."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def watch(self, pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
        if self._proc is None:
            self._proc = subprocess.Popen([sys.executable, "-m", "streams.embedded.reaper"], stdin=subprocess.PIPE)
        assert self._proc.stdin is not None
        try:
            started = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            return
        self._proc.stdin.write(f"{pid} {int(sig)} {started!r}\n".encode())
        self._proc.stdin.flush()

    def close(self) -> None:
        """Let the watchdog go (it signals whatever watched service is still running)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(GRACE_S + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _alive(pid: int, started: float) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
        return p if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the parent's to handle
    watched: list[tuple[int, int, float]] = []
    for line in sys.stdin.buffer:  # until the parent closes the pipe or dies
        pid, sig, started = line.split()
        watched.append((int(pid), int(sig), float(started)))
    procs = []
    for pid, sig, started in reversed(watched):  # the reverse of the start order, as Stack.stop does
        p = _alive(pid, started)
        if p is not None:
            print(f"weir reaper: the process that started pid {pid} is gone; stopping it", file=sys.stderr)
            os.kill(pid, sig)
            procs.append(p)
    deadline = time.monotonic() + GRACE_S
    _, left = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
    for p in left:
        p.kill()


if __name__ == "__main__":
    main()
