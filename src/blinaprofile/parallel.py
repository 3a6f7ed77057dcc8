"""The one sample-parallel runner: local worker processes, results as they finish.

Featurizing a cohort and scoring a batch both run one function per sample in worker
processes. This module is the single place that decides how:

- a small pool of ``forkserver`` worker processes (safe whatever threads the calling
  process runs: BLAS pools, Jupyter, MLflow; like any spawning start method it re-imports
  a script's ``__main__`` in the workers, so scripts call the parallel API under
  ``if __name__ == "__main__":``);
- each worker holds one sample at a time (memory stays flat for any cohort size), and
  results are yielded in completion order so callers can save each one at once
  (resumable batches);
- an optional per-item time limit: a worker that has not answered in time is killed
  (``SIGKILL``) and replaced by a fresh one, and the item becomes an error
  (:class:`ItemTimeoutError`) while the others go on;
- a worker that dies on an item (out of memory, killed) is replaced too; that item becomes
  an error (:class:`WorkerDiedError`).

``n_jobs=1`` without a time limit runs in the calling process (no pool, no pickling); with a
time limit it uses one worker process, since a call running in this process cannot be
stopped safely.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from blinaprofile.errors import BlinaprofileError, one_line

__all__ = ["ItemTimeoutError", "WorkerDiedError", "run_parallel", "start_fork_server"]

#: Seconds a worker is given to exit after being asked to stop, before it is killed.
_STOP_GRACE = 5.0


class ItemTimeoutError(BlinaprofileError):
    """An item had no result within the time limit; its worker process was killed."""


class WorkerDiedError(BlinaprofileError):
    """A worker process died while working on an item (out of memory, killed...)."""


# --------------------------------------------------------------------------- worker side
def _worker_main(func: Callable[[Any], Any], conn: Any, threads: int = 1) -> None:
    """Loop of one worker process: receive ``(index, item)``, send ``(index, ok, value)``.

    ``None`` (or the parent closing the pipe) ends the loop. An exception raised by
    ``func`` is sent back as the value with ``ok=False`` (as a plain ``RuntimeError``
    naming it when it cannot be pickled). ``threads``: BLAS/OpenMP threads of this worker
    (the workers share the cores; more threads each only compete for them).
    """
    # Ctrl-C is the parent's to handle: it stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_threads(threads)
    conn.send(("ready", True, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        index, item = msg
        try:
            reply: tuple[Any, bool, Any] = (index, True, func(item))
        except Exception as err:
            reply = (index, False, err)
        try:
            conn.send(reply)
        except Exception as err:  # an unpicklable result or exception
            conn.send((index, False, RuntimeError(one_line(f"{type(err).__name__}: {err}"))))


def _limit_threads(n: int) -> None:
    """Cap the numeric libraries' thread pools in this process at ``n`` threads."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)  # for a library loaded later in this worker
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; only a speed-up
        return
    threadpool_limits(limits=n)  # for the ones already loaded (preloaded numpy)


@dataclass
class _Worker:
    """A worker process seen from the parent: its pipe and what it works on."""

    process: Any
    conn: Any
    ready: bool = False
    index: int | None = None
    started: float = 0.0


class _Pool:
    """Worker processes the parent starts, feeds one item at a time, kills and replaces."""

    def __init__(self, func: Callable[[Any], Any], size: int, preload: Sequence[str] = ()) -> None:
        import multiprocessing as mp

        self._ctx = mp.get_context("forkserver")
        if preload:
            # imported once in the fork server, which every worker is forked from; takes
            # effect when this process starts its fork server (its first pool)
            self._ctx.set_forkserver_preload(["__main__", *preload])
        self._func = func
        self._threads = max(1, (os.cpu_count() or 1) // max(1, size))
        self.workers: list[_Worker] = []
        try:
            for _ in range(size):
                self.workers.append(self._start())
        except BaseException:
            self.close()
            raise

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        # daemonic: should this process exit without closing the pool, a stuck worker is
        # terminated instead of being waited for
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self._func, child, self._threads),
            name="blinaprofile-worker",
            daemon=True,
        )
        proc.start()
        child.close()
        return _Worker(process=proc, conn=parent)

    def replace(self, w: _Worker) -> _Worker:
        """Kill ``w`` (if alive) and put a fresh worker in its place."""
        self._kill(w)
        new = self._start()
        self.workers[self.workers.index(w)] = new
        return new

    @staticmethod
    def _kill(w: _Worker) -> None:
        if w.process.is_alive():
            w.process.kill()
        w.process.join()
        w.conn.close()

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit, busy or slow ones are killed."""
        for w in self.workers:
            if w.index is None and w.process.is_alive():
                # a worker that died already has a broken pipe: nothing to tell it
                with contextlib.suppress(OSError):
                    w.conn.send(None)
        deadline = time.monotonic() + _STOP_GRACE
        for w in self.workers:
            if w.index is None:
                w.process.join(max(0.0, deadline - time.monotonic()))
            self._kill(w)
        self.workers = []


def start_fork_server(preload: Sequence[str] = ()) -> None:
    """Start the fork server now, importing ``preload`` in it, without waiting for it.

    The workers of a later :func:`run_parallel` call (with the same ``preload``) are forked
    from it: call this before other slow work (hashing the inputs, loading a model) and the
    server's imports happen meanwhile on another core instead of after it.
    """
    import multiprocessing as mp
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(["__main__", *preload])
    forkserver.ensure_running()


def _died(w: _Worker) -> str:
    """Why worker ``w`` (which has exited) is gone, in words."""
    code = w.process.exitcode
    if code == -signal.SIGKILL:
        return "the worker process was killed (SIGKILL: out of memory?)"
    if code is not None and code < 0:
        try:
            return f"the worker process died ({signal.Signals(-code).name})"
        except ValueError:
            return f"the worker process died (signal {-code})"
    return f"the worker process exited (exit code {code})"


def run_parallel[T, R](
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    n_jobs: int,
    on_error: Callable[[T, Exception], R],
    timeout: float | None = None,
    preload: Sequence[str] = (),
) -> Iterator[tuple[T, R]]:
    """Apply ``func`` to every item, in ``n_jobs`` processes when ``n_jobs > 1``.

    Parameters
    ----------
    func
        A picklable module-level function of one item.
    items
        The work; each item must be picklable.
    n_jobs
        Worker processes; ``1`` runs in this process (no pool, no pickling) unless a
        ``timeout`` is given, which needs a worker process that can be killed.
    on_error
        Turns an exception for an item into that item's result, so one bad sample never
        stops the others: one raised by ``func``, :class:`ItemTimeoutError` when the time
        limit passed, :class:`WorkerDiedError` when its worker died.
    timeout
        Seconds one item may take (``None``: no limit). A worker that has not answered in
        time is killed and replaced.
    preload
        Modules ``func`` will import (e.g. ``"blinaprofile.scoring.score"``): imported once
        in the fork server the workers are forked from, instead of once in every worker.

    Yields
    ------
    tuple
        ``(item, result)`` in completion order.

    Raises
    ------
    BlinaprofileError
        The worker processes could not start; results already yielded stay valid.
    ValueError
        ``timeout`` is not a positive number.
    """
    if timeout is not None and not timeout > 0:  # also refuses nan
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    todo = list(items)
    if timeout is None and (n_jobs <= 1 or len(todo) <= 1):
        for item in todo:
            try:
                res = func(item)
            except Exception as err:
                res = on_error(item, err)
            yield item, res
        return
    if not todo:
        return
    size = max(1, min(n_jobs, len(todo)))
    yield from _run_pool(func, todo, size, on_error, timeout, preload)


def _run_pool[T, R](
    func: Callable[[T], R],
    todo: list[T],
    size: int,
    on_error: Callable[[T, Exception], R],
    timeout: float | None,
    preload: Sequence[str] = (),
) -> Iterator[tuple[T, R]]:
    """:func:`run_parallel` with ``size`` worker processes (see there)."""
    from multiprocessing.connection import wait
    from multiprocessing.reduction import ForkingPickler

    pool = _Pool(func, size, preload)
    try:
        next_index = 0
        left = len(todo)
        while left:
            done: list[tuple[int, R]] = []
            # 1. give every idle worker an item
            for w in pool.workers:
                while w.ready and w.index is None and next_index < len(todo):
                    i = next_index
                    next_index += 1
                    try:
                        payload = ForkingPickler.dumps((i, todo[i]))
                    except Exception as err:  # the item cannot be pickled
                        done.append((i, on_error(todo[i], err)))
                        continue
                    try:
                        w.conn.send_bytes(payload)
                    except OSError:
                        # the worker died just now: its death is seen below, the item waits
                        next_index = i
                        break
                    w.index, w.started = i, time.monotonic()
            # 2. hand out what finished
            for i, res in done:
                left -= 1
                yield todo[i], res
            if not left:
                break
            done = []
            # 3. wait for a result, a worker's death or the next deadline
            wait_for: float | None = None
            if timeout is not None:
                ends = [w.started + timeout for w in pool.workers if w.index is not None]
                wait_for = max(0.0, min(ends) - time.monotonic()) if ends else None
            by_handle: dict[Any, _Worker] = {}
            for w in pool.workers:
                by_handle[w.conn] = w
                by_handle[w.process.sentinel] = w
            woken = {id(by_handle[h]): by_handle[h] for h in wait(list(by_handle), wait_for)}
            for w in woken.values():
                done.extend(_collect(pool, w, todo, on_error))
            # 4. kill workers past the time limit
            if timeout is not None:
                now = time.monotonic()
                for w in list(pool.workers):
                    if w.index is not None and now - w.started >= timeout:
                        i = w.index
                        pool.replace(w)
                        late = ItemTimeoutError(
                            f"no result within {timeout:g} s; the worker process was stopped"
                        )
                        done.append((i, on_error(todo[i], late)))
            for i, res in done:
                left -= 1
                yield todo[i], res
    finally:
        pool.close()


def _collect[T, R](
    pool: _Pool, w: _Worker, todo: list[T], on_error: Callable[[T, Exception], R]
) -> list[tuple[int, R]]:
    """Read what worker ``w`` sent; replace it if it died (its item becomes an error)."""
    out: list[tuple[int, R]] = []
    while True:
        try:
            if not w.conn.poll():
                break
            msg = w.conn.recv()
        except (EOFError, OSError):  # the pipe closed: the process is exiting
            break
        index, ok, value = msg
        if index == "ready":
            w.ready = True
            continue
        w.index = None
        out.append((index, value if ok else on_error(todo[index], value)))
    if w.process.is_alive():
        return out
    w.process.join()
    if not w.ready:
        raise BlinaprofileError(
            "the worker processes could not start; in a script, call the parallel API "
            'under `if __name__ == "__main__":` (or use n_jobs=1)'
        )
    lost, reason = w.index, _died(w)
    pool.replace(w)
    if lost is not None:
        out.append((lost, on_error(todo[lost], WorkerDiedError(reason))))
    return out
