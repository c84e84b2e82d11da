"""The ``circuits`` program with its imports already made, for tests that run it many times.

Each start of the program imports torch and transformers, and a command that loads a model
imports nnsight and the model's transformers class too: 5-7 s on one core before the command
computes anything. The README test runs the program some thirty times, so a third of its time
went to those imports. Here one server process makes them once and forks a child per command; a
small stand-in ``circuits`` placed first on ``PATH`` hands the server its arguments, working
folder, environment and standard streams, waits, and exits with the command's status. The child
becomes that command: it runs the program's own entry point (`circuits_entry.entry`) and exits
as the program would, atexit callbacks included.

When the stand-in's environment differs from the server's (a variable the command is given, read
at import), or the server is not there, the stand-in runs the installed program itself. The
installed script is checked as a real process elsewhere (tests/test_cli.py, test_interrupt.py).

Run as a script, this module is the server: ``python warm_program.py SOCKET PROGRAM``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

# What the commands import only once they run (a model's transformers class, nnsight, plots,
# probes): 3-5 s more per command that loads a model, on one core. Made once here too. An
# import that fails is left to the command, which then meets the failure itself.
PRELOAD = ("nnsight", "transformers.models.gpt2.modeling_gpt2", "matplotlib.pyplot",
           "scipy.stats", "sklearn.linear_model")
# what bash sets or changes by itself in the environment of each command it runs
VOLATILE = ("PWD", "OLDPWD", "SHLVL", "_")
HEADER = struct.Struct("!I")  # the request's length, then the request as JSON
STATUS = struct.Struct("!i")  # the command's exit status as os.waitstatus_to_exitcode gives it

STAND_IN = """#!{python} -S
# stand-in for {real}: runs it in the warm server (tests/warm_program.py), or itself
import json, os, socket, struct, sys
request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}})
request = request.encode()
try:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect({socket!r})
    socket.send_fds(sock, [struct.pack("!I", len(request))], [0, 1, 2])
    sock.sendall(request)
    answer = b""
    while len(answer) < 4 and (part := sock.recv(4 - len(answer))):
        answer += part
except OSError:
    answer = b""
if len(answer) < 4:  # no server, or not this environment: the real program
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
status = struct.unpack("!i", answer)[0]
sys.exit(status if status >= 0 else 128 - status)
"""


def _steady(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without what bash sets by itself for each command."""
    return {k: v for k, v in env.items() if k not in VOLATILE}


def _read(conn: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from `conn` (fewer if it closes)."""
    data = b""
    while len(data) < size and (part := conn.recv(size - len(data))):
        data += part
    return data


def _become(request: dict, fds: list[int], program: str, added: dict[str, str]) -> None:
    """In the forked child: take on the command's folder, environment (with what the imports
    `added`, as in a process that made them), streams and arguments."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(added)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.argv = [program, *request["argv"]]


def _run(request: dict, fds: list[int], program: str, added: dict[str, str]) -> None:
    """In the forked child: run the command; leaves only through SystemExit, as the program."""
    import circuits_entry

    _become(request, fds, program, added)
    try:
        circuits_entry.entry()
    except SystemExit:
        raise
    except BaseException:  # what the interpreter does with an exception nothing caught
        traceback.print_exc()
        sys.exit(1)
    sys.exit(0)


def _start(conn: socket.socket, own: dict[str, str], added: dict[str, str], program: str,
           listening: socket.socket, log_path: str) -> int | None:
    """Read one request from `conn`, note it in `log_path` and fork its command; the child's
    pid, or None when the stand-in is to run the real program (another environment than the
    server's own, `own`)."""
    header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    request = json.loads(_read(conn, HEADER.unpack(header)[0]))
    if _steady(request["env"]) != own or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(json.dumps(request["argv"]) + "\n")  # the commands it ran, for the tests
    pid = os.fork()
    if pid == 0:
        listening.close()
        conn.close()
        _run(request, fds, program, added)
    for fd in fds:  # the child's now: the test sees the end of the output when it exits
        os.close(fd)
    return pid


def serve(path: str, program: str) -> None:
    """Import the program, then fork a child per request on the Unix socket at `path`."""
    own = _steady(os.environ)
    import circuits.cli  # noqa: F401
    import circuits_entry  # noqa: F401  the program's own imports, made once here

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # variables the imports set (sklearn: KMP_DUPLICATE_LIB_OK, ...)
    added = {k: v for k, v in _steady(os.environ).items() if own.get(k) != v}
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(path + ".new")
    listening.listen(8)
    os.rename(path + ".new", path)  # the socket appears once it accepts
    listening.settimeout(0.05)
    running: dict[int, socket.socket] = {}
    while True:
        try:
            conn, _ = listening.accept()
        except TimeoutError:
            conn = None
        if conn is not None:
            conn.settimeout(None)
            pid = _start(conn, own, added, program, listening, path + ".log")
            if pid is None:
                conn.close()  # the stand-in runs the real program
            else:
                running[pid] = conn
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = running.pop(pid)
            with contextlib.suppress(OSError):
                conn.sendall(STATUS.pack(os.waitstatus_to_exitcode(status)))
            conn.close()


@contextlib.contextmanager
def warm_program(env: dict[str, str], folder: Path, wait: float = 120) -> Iterator[dict[str, str]]:
    """Start the server for the ``circuits`` found on ``env["PATH"]``; yields `env` with the
    stand-in first on ``PATH`` (the server's environment too). The arguments of each command
    the server ran are lines of ``folder/server.sock.log``. Without an installed program, `env`
    as given, also where a "#!" line cannot name this Python (a space in its path)."""
    real = next((Path(d) / "circuits" for d in env["PATH"].split(os.pathsep)
                 if (Path(d) / "circuits").is_file()), None)
    if real is None or " " in sys.executable or len(sys.executable) > 120:
        yield env  # the stand-in's "#!" line could not name this Python
        return
    bin_dir, path = folder / "bin", str(folder / "server.sock")
    bin_dir.mkdir(parents=True, exist_ok=True)
    stand_in = bin_dir / "circuits"
    stand_in.write_text(STAND_IN.format(python=sys.executable, real=str(real), socket=path))
    stand_in.chmod(0o755)
    env = dict(env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    server = subprocess.Popen([sys.executable, __file__, path, str(real)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + wait
        while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        yield env
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
