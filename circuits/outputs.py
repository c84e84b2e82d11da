"""Writing a command's outputs as one set, and showing how far a long loop has come.

Staged outputs
    A command that writes several files writes them into a hidden staging folder inside its
    output folder (`staged`), then moves them all into place with Ctrl-C held back, so the
    output folder holds either the previous complete set of files or the new one: never a mix,
    never half a file. An error or a Ctrl-C before the move leaves the old files as they were.

Progress
    `progress_bar` is a tqdm bar on stderr with the elapsed time and an estimate of the time
    left, for loops of known length. `activity` is a one-line indicator with what runs and a
    ticking clock, for steps whose length is not known ahead (loading a model, scoring, finding
    the smallest faithful circuit). Both show on a terminal only (so logs and tests read clean),
    and only the outermost activity shows: a library call made inside a command's own indicator
    stays quiet.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import distributed

# whether an activity line is showing in this context (only the outermost one shows)
_SHOWING: contextvars.ContextVar[bool] = contextvars.ContextVar("circuits_activity",
                                                                default=False)


@contextlib.contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """A staging folder inside `out`; the files left in it when the block ends are moved into
    `out` together, with SIGINT held back during the moves.

    Parameters
    ----------
    out : str or Path
        The output folder (created when missing).

    Yields
    ------
    Path
        The staging folder: write the outputs there, under their final names.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> with staged(out) as folder:
    ...     _ = (folder / "a.txt").write_text("new")
    >>> sorted(p.name for p in out.iterdir())
    ['a.txt']
    >>> try:
    ...     with staged(out) as folder:
    ...         _ = (folder / "a.txt").write_text("half")
    ...         raise RuntimeError("failed while writing")
    ... except RuntimeError:
    ...     pass
    >>> (out / "a.txt").read_text()  # the previous complete file is kept
    'new'
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield staging
        move_into_place(sorted(p for p in staging.iterdir() if p.is_file()), out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(files: list[Path], out: Path) -> list[Path]:
    """Move `files` into folder `out` (same names), with SIGINT held back until all are moved
    (in the main thread, where signals are delivered); returns the new paths."""
    with sigint_held():
        for f in files:
            os.replace(f, out / f.name)
    return [out / f.name for f in files]


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Inside the block a Ctrl-C waits; it is delivered when the block ends (main thread on a
    POSIX system; elsewhere the block changes nothing)."""
    if (not hasattr(signal, "pthread_sigmask")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def progress_bar(total: int | None, desc: str, unit: str = "it",
                 enabled: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr with elapsed time, rate and time left; shown only on a terminal
    unless `enabled` says otherwise. Use it as a context manager and call ``update(n)``.

    Parameters
    ----------
    total : int or None
        How many units the work has (None: unknown, no time left is shown).
    desc : str
        What runs, e.g. ``"tuned lens"``.
    unit : str
    enabled : bool, optional
        Show the bar; by default only when stderr is a terminal.

    Returns
    -------
    tqdm.tqdm

    Examples
    --------
    >>> with progress_bar(3, "demo", enabled=False) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    >>> bar.disable, bar.total
    (True, 3)
    """
    from tqdm import tqdm

    show = _on_terminal() if enabled is None else bool(enabled)
    return tqdm(total=total, desc=f"circuits: {desc}", unit=unit, file=sys.stderr,
                leave=False, disable=not show, dynamic_ncols=True, **kwargs)


def _on_terminal() -> bool:
    """Whether progress shows: stderr is a terminal, and this process is the job's rank 0."""
    return sys.stderr.isatty() and distributed.is_main()


class Stages:
    """A one-line indicator on stderr, ``circuits: STEP ... [elapsed]``, with the clock ticking
    every second; calling it with a step's name marks the previous one done. Shown when
    `enabled` (by default: stderr is a terminal and no other indicator shows); see `activity`."""

    def __init__(self, names: Sequence[str] = (), enabled: bool | None = None) -> None:
        self.enabled = (_on_terminal() and not _SHOWING.get()) if enabled is None \
            else bool(enabled)
        self.total = max(1, len(names))
        self.bar: Any = None
        self.stop = threading.Event()
        self.ticker: threading.Thread | None = None
        self._token: contextvars.Token | None = _SHOWING.set(True) if self.enabled else None

    def __call__(self, name: str) -> None:
        """Mark the previous step done and show `name` as running."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            # steps differ in length by orders of magnitude: show the step and the clock, not
            # a misleading fraction done
            self.bar = tqdm(total=self.total, file=sys.stderr, leave=False,
                            bar_format="circuits: {desc} [{elapsed}]", desc=name + " ...")
            # tqdm redraws only when called; a long step would freeze the clock
            self.ticker = threading.Thread(target=self._tick, daemon=True)
            self.ticker.start()
        else:
            self.bar.update(1)
            self.bar.set_description_str(name + " ...")

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            self.bar.refresh()

    def close(self) -> None:
        """Stop the clock and erase the line."""
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join()
        if self.bar is not None:
            self.bar.close()
        if self._token is not None:
            _SHOWING.reset(self._token)
            self._token = None


@contextlib.contextmanager
def activity(name: str, names: Sequence[str] = (), enabled: bool | None = None
             ) -> Iterator[Stages]:
    """Show ``circuits: NAME ... [elapsed]`` while the block runs (see `Stages`); yields the
    indicator, which renames the running step when called. Erased also when the block fails.

    Examples
    --------
    >>> with activity("scoring", enabled=False) as step:
    ...     step("writing")
    """
    shown = Stages(names or [name], enabled)
    try:
        shown(name)
        yield shown
    finally:
        shown.close()
