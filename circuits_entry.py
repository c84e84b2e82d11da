"""The ``circuits`` program's entry point, outside the package so that it runs first.

Importing the package loads torch and transformers, which takes a second or more; a Ctrl-C in
that time would otherwise end in Python's traceback. Here it ends like any other Ctrl-C: one
line on stderr starting ``circuits: interrupted`` and exit status 130.

"Ctrl-C at any moment" means from the moment the program has started, that is once `entry`
runs: its first step gives SIGINT Python's default handler, also when the program was started
with SIGINT ignored (``circuits ... &`` from a script without job control; ``kill -INT`` then
stops it too). A Ctrl-C from then on, while the package imports, the model loads, the method
runs or the outputs are written, ends with that one line and 130; once the command has
finished, one is ignored and the program exits with the command's status. A Ctrl-C during the
interpreter's own start-up, before any of the program's code runs (Python initializing,
importing its ``site`` module, importing this module), is outside it: Python handles it itself
(a traceback, or "Fatal Python error" and exit status 1), or drops it when SIGINT was ignored
at start.
"""

import signal
import sys
from typing import NoReturn


def entry() -> None:
    """Import the command line, run it, exit with its status."""
    try:
        # inside the try: a Ctrl-C that arrives as soon as the handler is in place stops here too
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from circuits.cli import entry as run
    except KeyboardInterrupt:
        _stop(" while starting")
    try:
        run()
    except KeyboardInterrupt:  # just before `main` installs its own handler, or after it ends
        _stop("")


def _stop(when: str) -> NoReturn:
    """One line and exit status 130; a second Ctrl-C cannot interrupt the shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"\ncircuits: interrupted{when}", file=sys.stderr)
    sys.exit(130)
