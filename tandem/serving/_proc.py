"""Helpers shared by child processes: die with the supervisor, never outlive it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent", "pid_alive", "rss_bytes"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` when the supervisor dies (Linux), so no worker is orphaned.

    If the supervisor is already gone (it died while this process started), exit at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the ppid check below still applies
            pass
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of process `pid` (default: this one) in bytes, from /proc; 0 where it cannot be read."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs; a zombie (dead, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
