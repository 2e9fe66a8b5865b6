"""One process per pytest worker that imports the stack once and forks a copy of itself for each `python ...` the
suite starts through `tests.helpers.python` (client: tests/forked.py).

A fresh interpreter spends about 5 CPU-seconds importing torch, transformers, DeepSpeed, accelerate and distill
before a 2-process test run does anything, and 1.5 s tearing them down: most of a tiny run's cost, paid by about
70 commands of the suite. A run's own ranks already skip it (`distill.runtime.compat.forked_ranks`); here the
launching process skips it too. What runs in the fork is the command as given: its arguments, working directory,
environment, standard streams, exit status and signals (the client passes SIGTERM and SIGINT on), in a process
group of its own. It is started only where that is the same as a fresh start: `tests/forked.py` starts a fresh
interpreter instead when the environment differs in a variable read at import, when Python flags are given, or
when the command would import distill from other files (docs/reliability.md#how-the-tests-start-their-processes).

    python -m tests.forkserver SOCKET     # started by tests/conftest.py; DISTILL_TEST_FORK=0 turns it off
"""
from __future__ import annotations

import array
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import traceback


def import_stack() -> None:
    """What a launching process imports before it forks its ranks (`python -m distill.train`, tests/scripts/launch.py),
    so that they start with it imported."""
    import accelerate.commands.launch  # noqa: F401
    import deepspeed  # noqa: F401
    import torch.distributed.run  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import distill.cli.train  # noqa: F401
    import distill.trainers  # noqa: F401


def main(path: str) -> None:
    before = dict(os.environ)
    import_stack()
    # what the imports set when unset (DeepSpeed's PYTORCH_NVML_BASED_CUDA_CHECK, torch's inductor cache directory)
    added = {k: v for k, v in os.environ.items() if before.get(k) != v}
    if threading.active_count() != 1:  # a fork would copy another thread's locks held: serve nothing
        raise SystemExit(f"forkserver: {threading.active_count()} threads after the imports; not serving")
    import distill
    import tests

    own = {sys.path[0], *os.environ.get("PYTHONPATH", "").split(os.pathsep)}
    info = {"env": before, "added": added, "roots": {
        "distill": os.path.dirname(os.path.realpath(distill.__file__)),
        "tests": os.path.dirname(os.path.realpath(tests.__file__))}}
    base = [p for p in sys.path if p not in own]  # the interpreter's own entries (stdlib, site-packages)
    gc.freeze()  # what the imports made is never collected in a fork: each fork's collections skip it, and its pages stay shared
    sys.stdout.flush()  # nothing the imports printed may reach a command's output
    sys.stderr.flush()
    with open(path + ".json.tmp", "w") as f:
        json.dump(info, f)
    os.replace(path + ".json.tmp", path + ".json")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(1.0)
    worker = os.getppid()
    while os.getppid() == worker:  # the pytest worker that started this one is gone: stop
        _reap()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        if os.fork() == 0:
            listener.close()
            _keep(conn, base, added)  # never returns: the keeper and the command end with os._exit
        conn.close()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _keep(conn: socket.socket, base: list[str], added: dict[str, str]) -> None:
    """Receive one request, fork the command, tell the client its pid, then its exit status. If the client goes
    away first (killed on a test's timeout), the command's process group is killed."""
    conn.settimeout(None)
    fds: list[int] = []
    size = int.from_bytes(_recv_exact(conn, 8, fds), "big")
    request = json.loads(_recv_exact(conn, size, fds))
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request, fds, base, added)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    try:
        watch = [conn, os.pidfd_open(pid)]
    except (AttributeError, OSError):
        watch = [conn]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        ready, _, _ = select.select(watch, [], [], 0.5)
        if conn in ready and not conn.recv(1):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            break
    try:
        conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    except OSError:
        pass
    os._exit(0)


def _recv_exact(conn: socket.socket, n: int, fds: list[int]) -> bytes:
    data = b""
    while len(data) < n:
        chunk, ancillary, _, _ = conn.recvmsg(n - len(data), socket.CMSG_SPACE(3 * array.array("i").itemsize))
        if not chunk:
            raise SystemExit("forkserver: the client went away mid-request")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
        data += chunk
    return data


def _run(request: dict, fds: list[int], base: list[str], added: dict[str, str]) -> None:
    """The command, as `python ARGV` would run it, in this forked process; ends the process with its status."""
    os.setpgid(0, 0)
    for target, fd in enumerate(fds):  # the client's stdin, stdout, stderr
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**added, **request["env"]})  # as the imports would have left a fresh process's
    argv = request["argv"]
    how = argv[0] if argv[0] in ("-m", "-c") else "script"
    # sys.path[0] as Python sets it: the working directory for -m, "" for -c, the script's directory
    first = os.getcwd() if how == "-m" else "" if how == "-c" else os.path.dirname(os.path.abspath(argv[0]))
    extra = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *base]
    if threads := os.environ.get("OMP_NUM_THREADS"):  # read when torch loaded OpenMP, in the server: set it as it would be
        import torch

        torch.set_num_threads(int(threads))
    tests_root = os.path.dirname(os.path.realpath(sys.modules["tests"].__file__))
    if not any(os.path.realpath(os.path.join(p, "tests")) == tests_root for p in sys.path):
        for name in [n for n in sys.modules if n == "tests" or n.startswith("tests.")]:
            del sys.modules[name]  # a fresh `python ARGV` could not import the suite's package: nor can this one
    sys.argv = list(argv) if how == "script" else [argv[1] if how == "-m" else "-c", *argv[2:]]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import runpy

    try:
        if how == "-m":
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif how == "-c":
            import types

            main = sys.modules["__main__"] = types.ModuleType("__main__")  # a new, empty one, as `python -c` has
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
        if not (code is None or isinstance(code, int)):  # sys.exit("message"), as the interpreter reports it
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    # The exit a fresh interpreter makes, less the teardown of every module the server imported (1.3-1.7 s of CPU):
    # exit handlers (weakref finalizers, multiprocessing's, the libraries'), then the streams.
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main(sys.argv[1])
