"""A warm pytest launcher for mutation testing (`nox -s mutants`).

Each mutant needs a fresh interpreter (the mutated module must be imported anew), but most of
a short test run is spent importing torch and friends. ``serve`` imports those once and,
for every request, forks a child that runs ``pytest.main(args)`` with nothing of prunebench
imported yet; ``run`` is the light client mutmut calls as its runner and exits with pytest's
status (a collection error or a crash as 1, a failure, which is what it is for a mutant). A
client that goes away (mutmut's timeout) takes its child with it.

    python tests/_forkserver.py serve SOCKET &
    python tests/_forkserver.py run SOCKET -x -q tests/test_ht2.py
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys


def _recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while not chunks or not chunks[-1].endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def serve(path: str) -> None:
    import numpy  # noqa: F401  (warm imports: everything prunebench's tests load, but prunebench)
    import pytest  # noqa: F401
    import scipy  # noqa: F401
    import tensorly  # noqa: F401
    import torch  # noqa: F401
    import torch_pruning  # noqa: F401

    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = server.accept()
        with conn:
            args = json.loads(_recv_all(conn))
            pid = os.fork()
            if pid == 0:  # the child: a fresh pytest run in the caller's folder
                server.close()
                conn.close()
                code = 3
                try:
                    import pytest

                    os.chdir(args["cwd"])
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 2)
                    code = int(pytest.main(args["argv"]))
                finally:
                    os._exit(code)
            status = None
            while status is None:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(st)
                    break
                readable, _, _ = select.select([conn], [], [], 0.05)
                if readable and not conn.recv(1):  # the client is gone: stop its run
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
            if status is not None:
                try:
                    conn.sendall(f"{status}\n".encode())
                except OSError:
                    pass


def run(path: str, argv: list[str]) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall((json.dumps({"argv": argv, "cwd": os.getcwd()}) + "\n").encode())
    reply = _recv_all(client).strip()
    if not reply:
        return 3
    code = int(reply)
    # mutmut counts only status 1 as a failing run; a mutant that breaks the import (pytest's
    # status 2, a collection error) or crashes the interpreter (a signal) fails the tests too
    return 1 if code == 2 or code < 0 else code


if __name__ == "__main__":
    command, sock, *rest = sys.argv[1:]
    if command == "serve":
        serve(sock)
    else:
        sys.exit(run(sock, rest))
