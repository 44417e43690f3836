"""Finding the processes a script started, wherever they ended up, through /proc.

A process started by a script inherits its environment, also after `setsid` and after its parent
exits and it is reparented to PID 1. So an environment variable with a value unique to one run
(``NHIGATE_CP_STATE_DIR=<a fresh tmp dir>``, or a tag set by the test) finds every process that
run started and that still lives, without trusting any PID file the script keeps itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Leftover:
    """A live process: its PID, parent PID, state letter and command line."""

    pid: int
    ppid: int
    state: str
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid} (ppid {self.ppid}, state {self.state}): {self.cmdline}"


def stat_fields(stat: str) -> tuple[str, int]:
    """(state, ppid) from the text of /proc/PID/stat (the command name may hold spaces and ')')."""
    rest = stat.rsplit(") ", 1)[1].split()
    return rest[0], int(rest[1])


def has_variable(environ: bytes, name: str, value: str) -> bool:
    """Whether the NUL-separated environment block of /proc/PID/environ sets name=value."""
    return f"{name}={value}".encode() in environ.split(b"\0")


def processes_with(name: str, value: str) -> list[Leftover]:
    """Every live (not zombie) process other than this one whose environment has name=value."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state, ppid = stat_fields((entry / "stat").read_text())
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited while we looked, or a kernel thread
        if state not in ("Z", "X") and has_variable(environ, name, value):
            found.append(Leftover(int(entry.name), ppid, state, cmdline.strip()))
    return found


def kill_all(leftovers: list[Leftover], timeout_s: float = 10.0) -> list[Leftover]:
    """SIGKILL each leftover (so a failing test does not leak it); return those still alive."""
    for proc in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    alive = leftovers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if is_running(p.pid)]
    return alive


def is_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    try:
        state, _ = stat_fields((PROC / str(pid) / "stat").read_text())
    except OSError:
        return False
    return state not in ("Z", "X")


def assert_none_left(name: str, value: str, what: str) -> None:
    """Fail, naming each one, if a process with name=value in its environment still runs; kill
    those first so the failure leaves nothing behind."""
    left = processes_with(name, value)
    if left:
        survivors = kill_all(left)
        listing = "\n".join(f"  {p}" for p in left)
        raise AssertionError(
            f"{what} left {len(left)} process(es) running ({name}={value}):\n{listing}"
            + (f"\nstill alive after SIGKILL: {[p.pid for p in survivors]}" if survivors else "")
        )
