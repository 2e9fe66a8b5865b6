"""`python tests/forked.py ARGS`: run `python ARGS` in a fork of this pytest worker's forkserver (tests/forkserver.py),
or, where that would not be the same as a fresh start, exec `python ARGS` itself. Imports the standard library only.

The command's exit status is this process's; SIGTERM and SIGINT sent here are passed on to it; if this process is
killed, the server kills the command's process group. `DISTILL_TEST_FORK_LOG`, if set, gets one line per command:
forked, or fresh and why.
"""
import array
import json
import os
import signal
import socket
import sys
import time

SOCKET_ENV = "DISTILL_TEST_FORKSERVER"
# A command may differ from the server's environment in these and still fork: nothing the server imported reads them
# at import (distill reads its own as it runs, pytest sets PYTEST_CURRENT_TEST per test and COLUMNS, a shell sets PWD
# and SHLVL), or the fork applies them as the import would have (PYTHONPATH to sys.path, OMP_NUM_THREADS to torch).
SAME_AT_IMPORT = ("PYTHONPATH", "OMP_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR", "TOKENIZERS_PARALLELISM", "COLUMNS", "LINES",
                  "PWD", "OLDPWD", "SHLVL", "_")
SAME_AT_IMPORT_PREFIXES = ("DISTILL_", "PYTEST_", "WANDB_")


def why_fresh(args: list[str], info: dict | None) -> str | None:
    """Why `python ARGS` must start fresh here, or None when a fork of the server runs it the same."""
    if info is None:
        return "no forkserver"
    if not args or (args[0].startswith("-") and args[0] not in ("-m", "-c")) or (args[0] in ("-m", "-c") and len(args) < 2):
        return f"python flags {args[:1]}"
    env, server, added = os.environ, info["env"], info["added"]
    for key in sorted(set(env) | set(server)):
        # the same as the server's before its imports, or what those imports set where it was unset
        if env.get(key) == server.get(key) or (key in added and env.get(key, added[key]) == added[key]):
            continue
        if key not in SAME_AT_IMPORT and not key.startswith(SAME_AT_IMPORT_PREFIXES):
            return f"environment differs in {key}"
    first = os.getcwd() if args[0] in ("-m", "-c") else os.path.dirname(os.path.abspath(args[0]))
    for entry in [first, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]:
        for name, root in info["roots"].items():
            here = os.path.join(entry, name)
            if os.path.isdir(here) and os.path.realpath(here) != root:
                return f"{name} would be imported from {here}"
    return None


def server_info(path: str | None, wait_s: float = 300.0) -> dict | None:
    """The server's start-up record, once it serves; None if there is none or it stopped before serving."""
    if not path:
        return None
    pid_file, deadline = path + ".pid", time.monotonic() + wait_s
    while not os.path.exists(path):  # still importing
        try:
            os.kill(int(open(pid_file).read()), 0)
        except (OSError, ValueError):
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    with open(path + ".json") as f:
        return json.load(f)


def log(line: str) -> None:
    if where := os.environ.get("DISTILL_TEST_FORK_LOG"):
        with open(where, "a") as f:
            f.write(line + "\n")


def main() -> None:
    args, path = sys.argv[1:], os.environ.get(SOCKET_ENV)
    why = why_fresh(args, server_info(path))
    conn = None
    if why is None:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
        except OSError as e:
            why = f"cannot reach the forkserver: {e}"
    log(f"{'forked' if why is None else 'fresh (' + why + ')'}: {' '.join(args[:4])}")
    if why is not None:
        os.execv(sys.executable, [sys.executable, *args])
    header = json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    conn.sendmsg([len(header).to_bytes(8, "big") + header],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    pid, pending = None, []

    def forward(sig, _frame):
        if pid is None:
            pending.append(sig)
        else:
            os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    replies = conn.makefile("rb")
    pid = json.loads(replies.readline())["pid"]
    for sig in pending:
        os.kill(pid, sig)
    line = replies.readline()
    code = json.loads(line)["exit"] if line else 1
    if code < 0:  # ended by a signal: end the same way, so the caller sees -N as from the process itself
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


if __name__ == "__main__":
    main()
