"""Progress bars for the long commands (featurize, train, score-batch), on stderr.

A bar is shown only when asked for (``show=True``) or, by default (``show=None``), when
stderr is a terminal: piped or redirected output (logs, CI, notebooks capturing stderr)
stays free of carriage returns. Commands create their bar before their first slow step,
so something is on screen within a second or two of starting.

Bars are :mod:`tqdm` bars without tqdm's monitor thread, so a bar never adds a thread to a
process that is about to start worker processes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["Progress", "wants_progress"]


def wants_progress(show: bool | None = None) -> bool:
    """``show``, or (``None``) whether stderr is a terminal."""
    if show is not None:
        return bool(show)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Progress:
    """A progress bar, or nothing at all (every method is then a no-op).

    Parameters
    ----------
    total
        Steps expected (``None``: unknown yet; see :meth:`restart`).
    desc, unit
        What is counted (``"scoring"``, ``"sample"``).
    show
        See :func:`wants_progress`.
    """

    def __init__(
        self, total: int | None = None, *, desc: str, unit: str, show: bool | None = None
    ) -> None:
        self._bar: Any = None
        if wants_progress(show):
            from tqdm import tqdm

            class _Bar(tqdm):
                monitor_interval = 0  # no monitor thread

            self._bar = _Bar(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True)

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def restart(
        self, total: int | None, *, desc: str | None = None, unit: str | None = None
    ) -> None:
        """Count a new stage from 0 (``total`` steps) on the same line."""
        if self._bar is None:
            return
        if desc is not None:
            self._bar.set_description_str(desc, refresh=False)
        if unit is not None:
            self._bar.unit = unit
        self._bar.set_postfix_str("", refresh=False)
        self._bar.total = total
        self._bar.reset()

    def tick(self, total: int | None, note: str = "") -> None:
        """One step done of ``total`` (a callback: ``on_step(total, what)``)."""
        if self._bar is None:
            return
        if total is not None and self._bar.total != total:
            self._bar.total = total
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(1)

    def note(self, text: str) -> None:
        """Show ``text`` after the counts (e.g. the family and fold being fitted)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @contextlib.contextmanager
    def closed_on_error(self) -> Iterator[Progress]:
        """Close the bar if the block raises (the error then prints on a line of its own)."""
        try:
            yield self
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
