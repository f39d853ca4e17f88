"""Small helpers for child-process services: ports (free or fixed and checked), readiness, clean stop."""

from __future__ import annotations

import socket
import subprocess
import time

import psutil  # no stubs: ignore_missing_imports in pyproject.toml


class PortInUse(RuntimeError):
    """A service Weir was to start cannot have its configured port; the message names the setting."""


def claim_port(port: int, what: str, setting: str, instead: str | None = None) -> int:
    """``port`` when nothing listens on it (0: a free one), else :class:`PortInUse` naming ``setting`` and
    ``instead``, the setting that points Weir at a service already running there."""
    if port == 0:
        return free_port()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            use = f", or {instead} to use the service there instead of starting one" if instead else ""
            raise PortInUse(f"{what} cannot listen on 127.0.0.1:{port} ({exc.strerror}): another process has "
                            f"it. Set {setting} to a free port (0: any free one){use}") from None
    return port


def check_listener(pid: int, port: int, what: str, setting: str) -> None:
    """Raise :class:`PortInUse` unless process ``pid`` itself listens on ``port``: a service that lost the
    race for its port must not leave Weir talking to whoever won it."""
    try:
        ours = any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        ours = False
    except psutil.AccessDenied:  # another user's process (cannot look): the readiness check has to do
        return
    if not ours:
        raise PortInUse(f"{what} (pid {pid}) is not the one listening on 127.0.0.1:{port}: another process "
                        f"took the port. Set {setting} to a free port (0: any free one)")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature; callers retry on bind failure)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    """Block until 127.0.0.1:port accepts connections; raise with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def terminate(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the child."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
