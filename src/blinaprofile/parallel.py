"""The one sample-parallel runner: local worker processes, results as they finish.

Featurizing a cohort and scoring a batch both run one function per sample in worker
processes. This module is the single place that decides how: a ``forkserver`` pool (safe
whatever threads the calling process runs: BLAS pools, Jupyter, MLflow; like any spawning
start method it re-imports a script's ``__main__`` in the workers, so scripts call the
parallel API under ``if __name__ == "__main__":``), at most ``2 * n_jobs`` samples in
flight (memory stays flat for any cohort size), and results yielded in completion order
so callers can save each one at once (resumable batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from blinaprofile.errors import BlinaprofileError

__all__ = ["run_parallel"]


def run_parallel[T, R](
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    n_jobs: int,
    on_error: Callable[[T, Exception], R],
) -> Iterator[tuple[T, R]]:
    """Apply ``func`` to every item, in ``n_jobs`` processes when ``n_jobs > 1``.

    Parameters
    ----------
    func
        A picklable module-level function of one item.
    items
        The work; each item must be picklable.
    n_jobs
        Worker processes; ``1`` runs in this process (no pool, no pickling).
    on_error
        Turns an exception raised by ``func`` for an item into that item's result, so one
        bad sample never stops the others.

    Yields
    ------
    tuple
        ``(item, result)`` in completion order.

    Raises
    ------
    BlinaprofileError
        The workers could not start, or one died (out of memory, killed); results already
        yielded stay valid.
    """
    todo = list(items)
    if n_jobs <= 1 or len(todo) <= 1:
        for item in todo:
            try:
                res = func(item)
            except Exception as err:
                res = on_error(item, err)
            yield item, res
        return
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    got_any = False
    try:
        ctx = mp.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=min(n_jobs, len(todo)), mp_context=ctx) as pool:
            pending: dict[Future[R], T] = {}
            it = iter(todo)
            for item in it:
                pending[pool.submit(func, item)] = item
                if len(pending) >= 2 * n_jobs:
                    break
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    item = pending.pop(fut)
                    try:
                        res = fut.result()
                    except BrokenProcessPool:
                        raise
                    except Exception as err:
                        res = on_error(item, err)
                    nxt = next(it, None)
                    if nxt is not None:
                        pending[pool.submit(func, nxt)] = nxt
                    got_any = True
                    yield item, res
    except BrokenProcessPool as err:
        if not got_any:
            raise BlinaprofileError(
                "the worker processes could not start; in a script, call the parallel API "
                'under `if __name__ == "__main__":` (or use n_jobs=1)'
            ) from err
        raise BlinaprofileError(
            "a worker process died (out of memory?); the samples finished so far are kept"
        ) from err
