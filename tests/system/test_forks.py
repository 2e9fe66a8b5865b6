"""The suite's forked commands (tests/forkserver.py, tests/forked.py) run as a fresh `python ARGS` runs: what the
command sees, its exit status and signals; a command a fork would not run the same starts fresh; a killed client
takes its command with it."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.forked import SOCKET_ENV
from tests.helpers import python, pythonpath

pytestmark = pytest.mark.skipif(not os.environ.get(SOCKET_ENV), reason="DISTILL_TEST_FORK=0: no forkserver")

SEES = """
import json, os, sys, torch
import deepspeed, distill.trainers  # what a run imports; DeepSpeed sets PYTORCH_NVML_BASED_CUDA_CHECK where unset
open(sys.argv[1], "w").write(json.dumps({
    "argv": sys.argv[2:], "cwd": os.getcwd(), "path0": sys.path[0], "main": __name__,
    "env": {k: os.environ.get(k) for k in ("DISTILL_PROBE", "PYTORCH_NVML_BASED_CUDA_CHECK")}, "threads": torch.get_num_threads(),
    "imports": os.path.dirname(__import__("distill").__file__)}))
print("out"); print("err", file=sys.stderr)
raise SystemExit(int(sys.argv[2]))
"""


def _sees(cmd_prefix, tmp_path, name, code, **env):
    (tmp_path / "sees.py").write_text(SEES)
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([*cmd_prefix, str(tmp_path / "sees.py"), str(out), str(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    return proc, json.loads(out.read_text())


def test_a_forked_command_sees_what_a_fresh_one_sees_and_exits_the_same(tmp_path):
    log = tmp_path / "forks.log"
    env = {"DISTILL_PROBE": "x", "OMP_NUM_THREADS": "1", "DISTILL_TEST_FORK_LOG": str(log),
           "PYTHONPATH": pythonpath(tmp_path)}
    forked, f = _sees(python(), tmp_path, "forked", 3, **env)
    fresh, g = _sees([sys.executable], tmp_path, "fresh", 3, **env)
    assert log.read_text().startswith("forked:"), log.read_text()  # the fork ran it, not a fallback
    assert f == g and f["env"]["DISTILL_PROBE"] == "x" and f["threads"] == 1 and f["path0"] == str(tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == (3, "out\n", "err\n") == (fresh.returncode, fresh.stdout[-4:], fresh.stderr)
    # what the imports print (DeepSpeed's "Setting accelerator to CPU") the fork's imports printed in the server


def test_a_variable_read_at_import_starts_the_command_fresh(tmp_path):
    log = tmp_path / "forks.log"
    proc, seen = _sees(python(), tmp_path, "hf", 0, HF_HUB_OFFLINE="0", DISTILL_TEST_FORK_LOG=str(log))
    assert proc.returncode == 0 and log.read_text().startswith("fresh (environment differs in HF_HUB_OFFLINE)")


def test_signals_reach_the_command_and_a_killed_client_takes_it_with_it(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import os, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
                      "open(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    for end in ("terminate", "kill"):
        pid_file = tmp_path / f"{end}.pid"
        proc = subprocess.Popen(python(str(script), str(pid_file)))
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        command = int(pid_file.read_text())
        assert command != proc.pid  # the command is the fork, not the client
        getattr(proc, end)()
        # SIGTERM reaches the command, which ends with its own status; SIGKILL ends the client, and the server the command
        assert proc.wait(timeout=30) == {"terminate": 7, "kill": -signal.SIGKILL}[end]
        deadline = time.monotonic() + 10
        while _alive(command):
            assert time.monotonic() < deadline, f"the command outlived its client ({end})"
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has ended; its parent has yet to read its status
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
