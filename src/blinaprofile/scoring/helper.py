"""A helper process that draws one report figure while this process draws the other.

``blinaprofile score`` spends most of its report on two figures. A helper forked at the
start of the command, while the process still runs a single thread (before NumPy starts its
BLAS pool), imports the plotting libraries while the sample is scored, then draws the
gating figure while this process draws the cohort figure: two cores work on the report.

Forking is only done where it is safe: a POSIX system other than macOS, and a process with
no thread but its main one (the operating system's count, which includes threads started by
native libraries). The helper's imports cost CPU, so it is only started when a core is
likely free (:func:`free_core`: more than one core and a load average below their number).
Anywhere else :func:`start_helper` returns ``None`` and the caller draws everything itself;
so it does when the helper fails, takes too long or is not used. The job reaches the helper
as a pickle through a pipe from the process that forked it (nothing else can write to that
pipe), read with an allow-list of exact globals (:data:`JOB_GLOBALS`); its standard
streams are ``/dev/null``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "JOB_GLOBALS",
    "PRELOAD",
    "TIMEOUT",
    "Helper",
    "JobUnpickler",
    "free_core",
    "load_job",
    "one_thread",
    "start_helper",
]

#: modules the helper imports while it waits for its job (the gating figure's)
PRELOAD = (
    "numpy",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "blinaprofile.gating.plot",
    "blinaprofile.io.read",
    "blinaprofile.scoring.report",
)
#: seconds the helper's figure is waited for before it is drawn here instead
TIMEOUT = 120.0


def free_core() -> bool:
    """Whether a core is likely idle: more than one, and a load average below their number.

    A helper costs its own imports (about half a second of CPU); it shortens the command
    only when it runs on a core nothing else wants. On a machine already loaded past its
    cores the figures are drawn one after the other in this process instead.
    """
    cores = os.cpu_count() or 1
    if cores < 2:
        return False
    try:
        return os.getloadavg()[0] < cores
    except OSError:  # no load average on this system
        return True


#: The exact globals a job may name: the report's gating-figure job and what its arguments
#: (a bound gating strategy, its result, the read options) are made of. The job comes from
#: the process that forked the helper, through a pipe nothing else holds; the allow-list
#: keeps the helper to the project's rule that nothing is unpickled outside a list of exact
#: classes. A job naming anything else fails in the helper and is drawn by the parent.
JOB_GLOBALS = frozenset(
    {
        ("blinaprofile.scoring.report", "_gating_png"),
        ("blinaprofile.gating.tree", "GateTree"),
        ("blinaprofile.gating.gates", "Gate"),
        ("blinaprofile.gating.gates", "Dim"),
        ("blinaprofile.gating.gates", "GatingResult"),
        ("blinaprofile.config.gating", "TransformSpec"),
        ("blinaprofile.io.read", "FCSReadOptions"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("numpy", "dtype"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
    }
)


class JobUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in :data:`JOB_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in JOB_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not a helper job's global")
        return super().find_class(module, name)


def load_job(data: bytes) -> tuple[Callable[..., str], tuple[Any, ...]]:
    """``(func, args)`` of a job written by :meth:`Helper.submit` (allow-listed globals)."""
    import io

    func, args = JobUnpickler(io.BytesIO(data)).load()
    return func, tuple(args)


def one_thread() -> bool:
    """Whether this process runs a single thread, the only state a fork is safe in.

    Counts the operating system's threads where it can (Linux), as Python does before it
    warns that forking a multi-threaded process may deadlock the child: threads of native
    libraries (a BLAS pool, an allocator's background thread) count as well as Python's.
    """
    import threading

    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


class Helper:
    """The parent's side of a helper process: send it one job, take its text back.

    Parameters
    ----------
    pid
        The helper's process id.
    job, out
        This process's ends of the pipes to and from the helper.
    """

    def __init__(self, pid: int, job: int, out: int) -> None:
        self.pid = pid
        self._job: int | None = job
        self._out: int | None = out
        self._writer: Any = None

    def submit(self, func: Callable[..., str], *args: Any) -> None:
        """Send ``func(*args)`` to the helper (``func`` importable by name).

        The job is written by a thread: the helper reads it only once its imports are
        done, and this process goes on meanwhile.
        """
        import threading

        if self._job is None:
            return
        try:
            data = pickle.dumps((func, args), protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            self.close()  # something that cannot travel (code in a strategy): drawn here
            return
        fd, self._job = self._job, None

        def write() -> None:
            with contextlib.suppress(OSError), os.fdopen(fd, "wb") as fh:
                fh.write(data)

        self._writer = threading.Thread(target=write, name="blinaprofile-helper-job", daemon=True)
        self._writer.start()

    def result(self, timeout: float = TIMEOUT) -> str | None:
        """The helper's text, or ``None`` (it failed, or took more than ``timeout`` s)."""
        if self._out is None:
            return None
        fd, self._out = self._out, None
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        ok = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    break  # too slow: killed below
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    ok = True
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        status = self._reap(kill=not ok)
        if self._writer is not None:
            self._writer.join(timeout=1.0)
        if not ok or status != 0 or not chunks:
            return None
        return b"".join(chunks).decode("utf-8")

    def close(self) -> None:
        """Stop an unused helper and wait for it."""
        for name in ("_job", "_out"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._reap(kill=True)

    def _reap(self, *, kill: bool) -> int | None:
        if self.pid <= 0:
            return None
        pid, self.pid = self.pid, 0
        if kill:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return None


def start_helper(preload: Sequence[str] = PRELOAD) -> Helper | None:
    """Fork a helper that imports ``preload`` and then runs the one job it is sent.

    Returns
    -------
    Helper or None
        ``None`` where forking is not safe or cannot help (see the module doc).
    """
    if not (hasattr(os, "fork") and sys.platform != "darwin" and free_core() and one_thread()):
        return None
    job_r, job_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        for fd in (job_r, job_w, out_r, out_w):
            os.close(fd)
        return None
    if pid == 0:  # the helper; it leaves without running the parent's exit code
        code = 1
        try:
            os.close(job_w)
            os.close(out_r)
            _serve(job_r, out_w, preload)
            code = 0
        finally:
            os._exit(code)
    os.close(job_r)
    os.close(out_w)
    return Helper(pid, job_w, out_r)


def _serve(job: int, out: int, preload: Sequence[str]) -> None:
    """The helper: quiet streams, imports, then the job (none: the parent did not need it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for name in preload:
        importlib.import_module(name)
    with os.fdopen(job, "rb") as fh:
        data = fh.read()
    if not data:
        return
    func, args = load_job(data)
    text = func(*args)
    with os.fdopen(out, "wb") as fh:
        fh.write(text.encode("utf-8"))
