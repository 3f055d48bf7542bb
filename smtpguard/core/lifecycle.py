"""How long-running commands stop, and how the processes smtpguard starts stop with them.

Signals. ``serve``, ``detect``, ``collect --listen``, ``collect live``, ``console`` and
``audit --every`` treat SIGTERM (a service manager, ``kill``, a container stop) and SIGINT
(Ctrl-C) the same way, through :class:`Shutdown`:

- the **first** signal asks for a clean shutdown: stop taking input, finish or hand back the
  work in hand, write it and commit the offsets, print the summary, stop every child process,
  release the embedded store's lock, exit 0;
- a **second** signal during that shutdown exits at once with status 1, after killing the child
  processes (what was not committed is replayed by the next run).

Children. The local Tansu broker and rbldnsd are started with :func:`popen`: the kernel kills
them (SIGKILL) when the smtpguard process that started them dies, however it dies, SIGKILL
included (Linux ``PR_SET_PDEATHSIG``; no supervisor needed). They are also registered here, so
the second signal kills them before the process exits.

Example::

    with Shutdown() as stop:
        worker = Worker(stop.event)        # watches the event
        worker.run()                       # returns once it is set and the work is written
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()


def _die_with(parent: int, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when its parent dies (Linux), and exits at once if the
    parent died already between fork and exec."""
    libc_name = ctypes.util.find_library("c")

    def preexec() -> None:
        if libc_name and sys.platform.startswith("linux"):
            ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def popen(args: list[str], *, guard: bool = False, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` for a child that must never outlive this process (see the module doc).

    ``guard``: for a program that changes its user (rbldnsd drops root), which makes the kernel
    forget the parent-death signal: it runs under a small guard process (``python -m
    smtpguard.core.lifecycle``) that keeps the signal (SIGTERM to it) and stops the program when it
    gets it. The returned process is the guard; SIGTERM and SIGINT to it stop the program, SIGHUP,
    SIGUSR1 and SIGUSR2 are passed on.

    Start children from the main thread: the kernel ties the child to the thread that started it.
    """
    if guard:
        proc = subprocess.Popen([sys.executable, "-m", "smtpguard.core.lifecycle", *args],
                                preexec_fn=_die_with(os.getpid(), signal.SIGTERM), **kwargs)
    else:
        proc = subprocess.Popen(args, preexec_fn=_die_with(os.getpid()), **kwargs)
    with _children_lock:
        _children.add(proc)
    return proc


def forget(proc: subprocess.Popen) -> None:
    """A child that was stopped by its owner."""
    with _children_lock:
        _children.discard(proc)


def kill_children() -> None:
    with _children_lock:
        procs = list(_children)
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


class Shutdown:
    """SIGTERM and SIGINT handlers for a long-running command (a context manager; the previous
    handlers come back on exit). ``event`` is set by the first signal, and so are the ``also``
    events (a worker's own stop event); a second signal kills the children and exits with status 1."""

    def __init__(self, *also: threading.Event, name: str = "smtpguard"):
        self.event = threading.Event()
        self.also = list(also)
        self.name = name
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def watch(self, event: threading.Event) -> None:
        """Also set ``event`` when a signal arrives (set at once when one already has)."""
        self.also.append(event)
        if self.event.is_set():
            event.set()

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set():
            print(f"{self.name}: {name} again: stopping at once (status 1)", file=sys.stderr, flush=True)
            kill_children()
            os._exit(1)
        self.signal = name
        print(f"{self.name}: {name}: stopping (writing and committing what is in hand; {name} again to stop "
              f"at once)", file=sys.stderr, flush=True)
        self.event.set()
        for e in self.also:
            e.set()

    def __enter__(self) -> "Shutdown":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self.event.wait(timeout_s)


def _guard(argv: list[str]) -> int:
    """Run ``argv`` and stop it when this guard gets SIGTERM or SIGINT (its parent died, or was asked)."""
    child = subprocess.Popen(argv)

    def stop(signum: int, _frame: Any) -> None:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):  # passed on (rbldnsd reloads its zones on SIGHUP)
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    return child.wait()


if __name__ == "__main__":
    sys.exit(_guard(sys.argv[1:]))
