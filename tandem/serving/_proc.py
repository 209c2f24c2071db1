"""Helpers shared by child processes: die with the supervisor, never outlive it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent"]

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
