import collections
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# The suite means the CPU unless a test is marked `gpu`: the GPUs are hidden from this process and every process it
# starts, before anything starts CUDA (a 1-GPU machine would otherwise put one rank of each 2-process test on a GPU
# and the other on a device that does not exist). `gpu` tests hand the GPUs back to the processes they start
# (tests.helpers.gpu_env). The first conftest to run keeps the machine's setting; xdist workers inherit it.
os.environ.setdefault("DISTILL_TEST_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_sessionstart(session):
    """Start this process's forkserver (tests/forkserver.py: the suite's `python ...` commands fork from a process
    that imported the stack once), unless this is xdist's controller, which runs no test, or DISTILL_TEST_FORK=0."""
    config = session.config
    controller = not hasattr(config, "workerinput") and (getattr(config.option, "numprocesses", None) or 0) > 0
    if controller or os.environ.get("DISTILL_TEST_FORK", "1") == "0":
        return
    from tests.forked import SOCKET_ENV
    from tests.helpers import REPO

    where = tempfile.mkdtemp(prefix="distill-fork-")
    path = os.path.join(where, "socket")
    os.environ[SOCKET_ENV] = path  # before the server starts: it is part of the environment it records
    log = open(os.path.join(where, "server.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "tests.forkserver", path], cwd=REPO, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT)
    with open(path + ".pid", "w") as f:
        f.write(str(server.pid))
    session.config._distill_forkserver = (server, where, log)


def pytest_sessionfinish(session):
    server, where, log = getattr(session.config, "_distill_forkserver", (None, None, None))
    if server is not None:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(where, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The modules with the most 2-process tests first (each keeps its order): with two workers, one module per
    worker at a time (README's command), the long modules start early instead of leaving one worker alone at
    the end. `gpu` tests skipped where fewer GPUs are visible than they need."""
    weight = collections.Counter(item.module.__name__ for item in items if item.get_closest_marker("multiprocess"))
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.module.__name__, i)
    items.sort(key=lambda item: (-weight[item.module.__name__], first[item.module.__name__]))
    needs = {item: (m.args[0] if m.args else 1) for item in items if (m := item.get_closest_marker("gpu"))}
    if needs:
        from tests.helpers import machine_gpus

        have = machine_gpus()
        for item, n in needs.items():
            if have < n:
                item.add_marker(pytest.mark.skip(reason=f"needs {n} GPU{'s' if n > 1 else ''}, {have} visible"))


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Synthetic data, its tokenizer and a tiny random teacher, shared by the whole session."""
    from tests.helpers import tiny_assets

    root = tmp_path_factory.mktemp("assets")
    return {"root": root, **tiny_assets(root)}
