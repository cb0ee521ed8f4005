"""No process outlives the test run: SuperLinks, SuperNodes, Flower's SuperExecs, Ray.

Tests start Flower processes in sessions of their own (so a test can kill one by group),
which a Ctrl-C at the terminal does not reach, and `subprocess.run` answers an interrupt
by SIGKILL-ing its child, orphaning what that child started. So each pytest process (the
xdist controller and each worker) makes itself the child subreaper (Linux): orphans of
anything it started are re-parented to it, not to init. SIGTERM becomes a KeyboardInterrupt
(fixture teardown runs), and at exit every descendant left is terminated, then killed.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import sys

import psutil

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_descendants(timeout: float = 10.0) -> list[int]:
    """Terminate every live descendant of this process, kill those that stay; their pids."""
    try:
        family = psutil.Process().children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in family]


_installed = False


def install() -> None:
    """Once per process: subreaper, SIGTERM/SIGHUP as an interrupt, descendants stopped at exit."""
    global _installed
    if _installed:
        return
    _installed = True
    _become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    atexit.register(stop_descendants)
