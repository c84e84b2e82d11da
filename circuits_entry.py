"""The ``circuits`` program's entry point, outside the package so that it runs first.

Importing the package loads torch and transformers, which takes about a second; a Ctrl-C in
that second would otherwise end in Python's traceback. Here it ends like any other Ctrl-C: one
line and exit status 130.
"""

import signal
import sys


def entry() -> None:
    """Import the command line, run it, exit with its status."""
    # also when started with SIGINT ignored (`circuits ... &` from a script): `kill -INT` stops it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from circuits.cli import entry as run
    except KeyboardInterrupt:
        print("\ncircuits: interrupted while starting", file=sys.stderr)
        sys.exit(130)
    run()
