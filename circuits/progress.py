"""Stopping long runs cleanly on Ctrl-C, and keeping their progress so that they can resume.

Ctrl-C
    `sigint_handler` installs a SIGINT handler that records the interruption and raises
    KeyboardInterrupt at once, as Python's own does, so a run stops promptly. Python cannot
    raise an exception out of a finalizer (``__del__``, a weakref callback): a Ctrl-C landing in
    one is printed as "Exception ignored in ..." and the run goes on; libraries that catch
    every exception can swallow it as well. The recorded flag makes such a Ctrl-C count anyway:
    `check_interrupt` raises it again at the next safe point (every checkpoint save and every
    batch of `Setup.items`), the command line ends with status 130 when the flag is set, and
    the "Exception ignored" report of a swallowed Ctrl-C is not printed.

Progress
    A `Checkpoint` keeps the progress of one run in a folder: one ``<name>.safetensors`` file
    per kind of progress (a method's tensors, its JSON state in the file's metadata), each
    replaced atomically, so a crash at any instant (even SIGKILL) leaves the previous complete
    file, and ``run.json``, the description of the run the files belong to. Every file also
    carries a digest of that description: files of another run are never mixed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .errors import OptionError
from .files import write_atomic

if TYPE_CHECKING:
    from torch import Tensor

    from .model import Model

log = logging.getLogger(__name__)

FORMAT = "circuits.progress"
VERSION = 1
RUN_FILE = "run.json"
SUFFIX = ".safetensors"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESTART = "drop --resume (or resume=False) to start over"  # how to get past others' progress

_interrupted = False  # a SIGINT arrived since the outermost sigint_handler() was entered
_depth = 0  # how many sigint_handler() blocks are open (in the main thread)


def interrupted() -> bool:
    """Whether a SIGINT arrived since `sigint_handler` was entered (stays set after it exits).

    Returns
    -------
    bool
    """
    return _interrupted


def check_interrupt() -> None:
    """A safe point: raise KeyboardInterrupt if a Ctrl-C arrived (inside `sigint_handler`).

    A Ctrl-C that some code swallowed (a finalizer, a library catching every exception) is
    raised again here. Outside a `sigint_handler` block this does nothing.

    Raises
    ------
    KeyboardInterrupt

    Examples
    --------
    >>> with sigint_handler():
    ...     check_interrupt()  # no Ctrl-C: nothing happens
    >>> interrupted()
    False
    """
    if _interrupted and _depth > 0:
        raise KeyboardInterrupt


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Record the Ctrl-C, then stop whatever runs, as Python's own handler does."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_handler() -> Iterator[None]:
    """Inside the block, Ctrl-C raises KeyboardInterrupt and is also recorded (`interrupted`).

    The handler is installed in the main thread only (elsewhere the block changes nothing) and
    the previous one is restored on leaving. It replaces an inherited "ignore SIGINT" too (what
    a shell without job control gives a command started with ``&``), so ``kill -INT`` stops
    such a run as well. Entering the outermost block clears the record; it stays set after the
    block, so a caller can tell that a Ctrl-C arrived even when the code it ran swallowed the
    KeyboardInterrupt and returned. Inside the block a Ctrl-C raised in a finalizer, which
    Python can only report, is not reported (`check_interrupt` raises it again).

    Examples
    --------
    >>> import os, signal, time
    >>> try:
    ...     with sigint_handler():
    ...         os.kill(os.getpid(), signal.SIGINT)
    ...         time.sleep(5)  # not to the end: the handler raises at once
    ... except KeyboardInterrupt:
    ...     print("stopped", interrupted())
    stopped True
    """
    global _interrupted, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    previous_hook = sys.unraisablehook
    if _depth == 0:
        _interrupted = False
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _quiet_unraisable(previous_hook)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def _quiet_unraisable(hook: Any) -> Any:
    """`hook` for everything but a recorded Ctrl-C raised inside a finalizer, which is dropped
    (it is raised again at the next `check_interrupt`)."""

    def quiet(info: Any) -> None:
        if _interrupted and isinstance(info.exc_value, KeyboardInterrupt):
            return
        hook(info)

    return quiet


# -- progress files -----------------------------------------------------------------------------
def canonical(run: dict[str, Any]) -> dict[str, Any]:
    """`run` as it reads back from JSON (tuples become lists), checked to be JSON-able."""
    try:
        return json.loads(json.dumps(run, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise OptionError(f"the run description must be plain JSON data ({err})") from None


def _digest(run: dict[str, Any]) -> str:
    text = json.dumps(run, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _difference(saved: Any, wanted: Any, where: str = "") -> str | None:
    """The first field (dotted path) in which two run descriptions differ, or None."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in sorted(set(saved) | set(wanted), key=str):
            if key not in saved or key not in wanted:
                return f"{where}{key}"
            inner = _difference(saved[key], wanted[key], f"{where}{key}.")
            if inner is not None:
                return inner
        return None
    return None if saved == wanted else where.rstrip(".") or "run"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _lookup(run: Any, path: str) -> Any:
    for key in path.split("."):
        run = run.get(key, "(none)") if isinstance(run, dict) else "(none)"
    return run


class Checkpoint:
    """Progress of one long run, kept in a folder, each file written atomically.

    Parameters
    ----------
    folder : str or Path
        Where the progress files go (created at the first save, deleted by `finish`).
    run : dict
        A JSON-able description of the run: everything its results depend on (method, options,
        task, prompts, model fingerprint, seed, ...). Progress is only ever resumed by a run
        with the same description.
    resume : bool
        True: continue from the progress in `folder` if it is of this run (nothing there starts
        afresh). False: start over; old progress there is discarded at the first save.
    every : float
        Seconds between two writes of the same progress (`save` skips the writes in between,
        unless forced); 0 writes at every save.

    Raises
    ------
    OptionError
        `resume` and `folder` holds the progress of a different run (the message names the
        first field that differs), or `run` is not JSON data.

    Examples
    --------
    >>> import tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> ck = Checkpoint(folder, {"method": "demo", "n": 3}, every=0)
    >>> ck.save("sweep", {"sums": torch.ones(2)}, {"done": 1})
    >>> again = Checkpoint(folder, {"method": "demo", "n": 3}, resume=True)
    >>> tensors, state = again.load("sweep")
    >>> tensors["sums"].tolist(), state
    ([1.0, 1.0], {'done': 1})
    >>> Checkpoint(folder, {"method": "demo", "n": 4}, resume=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: ...differs in n (there 3, now 4); drop --resume to start over
    >>> again.finish()
    >>> again.load("sweep") is None
    True
    """

    def __init__(self, folder: str | Path, run: dict[str, Any], resume: bool = False,
                 every: float = 5.0) -> None:
        if not isinstance(every, (int, float)) or every < 0:
            raise OptionError(f"every must be a number of seconds >= 0, got {every!r}")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OptionError(f"{self.folder} is a file, where the progress folder goes; move "
                              "it away (it is not circuits' progress)")
        self.run = canonical(run)
        self.resume = bool(resume)
        self.every = float(every)
        self._digest = _digest(self.run)
        self._last: dict[str, float] = {}  # name -> time.monotonic() of its last write
        self._names: set[str] = set()  # the progress this run read or wrote
        # False until this run owns the folder: old progress is discarded (resume=False) or
        # found to be this run's (resume=True) at the first save
        self._claimed = False
        if self.resume:
            self._check_same_run()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.folder)!r}, resume={self.resume}, every={self.every})"

    def _check_same_run(self) -> None:
        """OptionError when the folder's run.json describes another run."""
        path = self.folder / RUN_FILE
        if not path.is_file():
            return
        try:
            doc = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            # torn by something outside this package (it writes the file atomically): the
            # digest in each progress file still guards them
            log.warning("progress description %s is unreadable; checking the files one by one",
                        path)
            return
        saved = doc.get("run") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(saved, dict):
            raise OptionError(f"{path} is not a description of circuits' progress, so the folder's "
                              f"progress cannot be checked against this run; {RESTART}")
        if doc.get("version") != VERSION:
            raise OptionError(f"{path} describes progress of format version "
                              f"{_short(doc.get('version'))}, not {VERSION}; {RESTART}")
        field = _difference(saved, self.run)
        if field is not None:
            raise OptionError(
                f"{self.folder} holds the progress of a different run: it differs in {field} "
                f"(there {_short(_lookup(saved, field))}, now {_short(_lookup(self.run, field))})"
                "; drop --resume to start over"
            )

    def _path(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"progress name must be letters, digits, '_', '.', '-': {name!r}")
        self._names.add(name)
        return self.folder / f"{name}{SUFFIX}"

    def load(self, name: str) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The tensors and JSON state saved under `name` by this run, or None.

        None also when resuming was not asked for, when the file is of another run, and when
        it cannot be read (damaged outside this package; the run then starts that part afresh,
        with a logged warning).

        Parameters
        ----------
        name : str

        Returns
        -------
        (dict[str, Tensor], dict) or None
        """
        path = self._path(name)
        if not (self.resume or self._claimed) or not path.is_file():
            return None
        try:
            data = path.read_bytes()
            tensors, meta = _unpack(data)
            if meta.get("format") != FORMAT or meta.get("run") != self._digest:
                return None
            state = json.loads(meta["state"])
        except Exception as err:  # any damage means: start this part afresh
            log.warning("progress file %s is unreadable (%s); starting it afresh", path, err)
            return None
        if not isinstance(state, dict):
            return None
        return tensors, state

    def load_for(self, name: str, header: dict[str, Any], what: str | None = None
                 ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """`load`, for progress whose state holds the `header` it was saved with (its
        `progress_key`: the settings it depends on beyond the run description).

        Returns None without progress; raises OptionError, naming the first header field that
        differs (a dotted path), for progress saved with another header. `what` names the
        progress in the message (`name` by default).
        """
        saved = self.load(name)
        if saved is None:
            return None
        header, old = canonical(header), saved[1].get("header")
        field = _difference(old, header) if isinstance(old, dict) else "its header"
        if field is not None:
            raise OptionError(f"the {what or name} progress in {self.folder} was saved by a "
                              f"different run (differs in {field}); {RESTART}")
        return saved

    def save(self, name: str, tensors: dict[str, Tensor], state: dict[str, Any],
             force: bool = False) -> None:
        """A safe point: stop if Ctrl-C was pressed, else keep this progress (throttled).

        Writes only if `every` seconds passed since the last write of `name` (or `force`, or
        the first time), as one file replaced atomically.

        Parameters
        ----------
        name : str
            Which progress (letters, digits, ``_ . -``); one file each.
        tensors : dict[str, Tensor]
            Saved on the CPU, exactly (safetensors).
        state : dict
            JSON data (floats round-trip exactly).
        force : bool

        Raises
        ------
        KeyboardInterrupt
            A Ctrl-C arrived (`check_interrupt`); nothing is written then, so the last file
            holds a state reached before it.
        """
        check_interrupt()
        path = self._path(name)
        now = time.monotonic()
        last = self._last.get(name)
        if not force and last is not None and now - last < self.every:
            return
        self._claim()
        write_atomic(path, _pack(tensors, state, self._digest))
        self._last[name] = time.monotonic()

    def _claim(self) -> None:
        """Before the first write: drop old progress (unless resuming) and describe the run."""
        if self._claimed:
            return
        if not _ours(self.folder / RUN_FILE):
            raise OptionError(f"{self.folder} holds a {RUN_FILE} that is not progress of "
                              "circuits; keep the progress in another folder")
        if not self.resume:
            self._remove_files()
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.iterdir():  # left by a crash inside write_atomic
            if _is_temporary(stale.name):
                stale.unlink(missing_ok=True)
        doc = {"format": FORMAT, "version": VERSION, "run": self.run}
        write_atomic(self.folder / RUN_FILE,
                     json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode("utf-8"))
        self._claimed = True

    def _remove_files(self) -> None:
        """Delete the progress files in the folder and nothing else: progress files (their
        metadata says so, or this run read or wrote them), run.json and the temporary files a
        crash while writing them left."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            name = path.name
            if not path.is_file():
                continue
            if name == RUN_FILE:
                drop = _ours(path)
            elif name.endswith(SUFFIX):
                drop = name[:-len(SUFFIX)] in self._names or _is_progress(path)
            else:
                drop = _is_temporary(name)
            if drop:
                path.unlink(missing_ok=True)

    def finish(self) -> None:
        """The run is complete: delete its progress files and the folder (if left empty)."""
        self._remove_files()
        with contextlib.suppress(OSError):
            self.folder.rmdir()
        self._last.clear()
        self._claimed = False
        self.resume = False


def _is_temporary(name: str) -> bool:
    """Whether `name` is one of `write_atomic`'s temporary files for a progress file."""
    return name.endswith(".tmp") and (name.startswith(f".{RUN_FILE}.")
                                      or (name.startswith(".") and f"{SUFFIX}." in name))


def _ours(run_file: Path) -> bool:
    """Whether a run.json is absent or this module's (a damaged one counts as its own)."""
    try:
        doc = json.loads(run_file.read_text("utf-8"))
    except (OSError, ValueError):  # missing, or torn by something outside this package
        return True
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _is_progress(path: Path) -> bool:
    """Whether a ``.safetensors`` file's metadata says it holds progress (read from its header)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 2**24:
                return False
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _pack(tensors: dict[str, Tensor], state: dict[str, Any], digest: str) -> bytes:
    """One safetensors file: the tensors (contiguous CPU copies) and the state as metadata."""
    from safetensors.torch import save

    plain = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    meta = {"format": FORMAT, "version": str(VERSION), "run": digest,
            "state": json.dumps(state, sort_keys=True)}
    return save(plain, metadata=meta)


def _unpack(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file's bytes."""
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not an object")
    return load(data), meta


def weights_key(model: Model) -> dict[str, str]:
    """The part of a progress key that names the weights: their fingerprint
    (`Model.fingerprint`, the same in every dtype) and the dtype they run in.

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> model = tiny_gpt2()
    >>> weights_key(model) == {"model": model.fingerprint, "dtype": "float32"}
    True
    """
    return {"model": model.fingerprint, "dtype": str(model.dtype).removeprefix("torch.")}
