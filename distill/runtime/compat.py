"""Every use of DeepSpeed's, accelerate's and torch's private API, in one place: each patch says why, and which
versions it was written for (DeepSpeed 0.19.8, accelerate 1.16, torch 2.13, the pins of pyproject.toml). After an
upgrade, this module is what to read again; `tests/system/test_layers.py` keeps the rest of the package off these
internals.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import runpy
import signal
import sys
import threading
import time
import types
from typing import Any, Iterator

import torch
from torch.multiprocessing import ProcessExitedException


def skip_cpu_shm_op() -> None:
    """Let DeepSpeed all-reduce through gloo on CPU instead of its shared-memory op.

    That op is compiled at the first start; a process killed while compiling leaves a lock file
    that makes every later start wait forever, and the compile needs a C++ toolchain.
    DeepSpeed 0.19: `deepspeed.ops.__compatible_ops__` is the table its CPU accelerator consults.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def skip_muon_import() -> None:
    """Spare each CPU process DeepSpeed's import of its Muon optimizer.

    DeepSpeed's ZeRO code imports its Muon modules whatever the optimizer (to check against Muon's class, and in
    the gradient reduction), and importing them compiles Muon's kernels with `torch.compile`, which imports
    inductor: 2.3 s per process, in every run on CPU, where no role uses Muon and nothing compiles unless asked.
    Stand-in modules answer those checks the same ("not Muon"); Muon's update is never called without it.
    DeepSpeed 0.19: the two module paths below are the ones its ZeRO code imports.
    """
    def unused(*args, **kwargs):
        raise RuntimeError("DeepSpeed's Muon is not loaded in distill's CPU processes")

    stand_ins = {"deepspeed.runtime.zero.muon.muon_optimizer": {"MuonWithAuxAdam": type("MuonWithAuxAdam", (), {})},
                 "deepspeed.runtime.zero.muon.original_muon": {"muon_update": unused, "adam_update": unused}}
    for name, attributes in stand_ins.items():
        if name not in sys.modules:
            module = types.ModuleType(name, "distill's stand-in: no role uses DeepSpeed's Muon on CPU")
            module.__dict__.update(attributes)
            sys.modules[name] = module


def restore_torch_linear() -> bool:
    """Undo DeepSpeed's process-wide swap of `torch.nn.functional.linear`; True if it was swapped.

    `deepspeed.zero.Init`, which runs when a ZeRO-3 role loads or is prepared, replaces
    `torch.nn.functional.linear` for the whole process with an autograd Function that can re-gather
    a ZeRO-3 weight in backward, and leaves it so. Every linear of every role then goes through
    Python (`Function.apply` binds its arguments with `inspect` on each forward call), a host cost on
    every step (docs/performance.md).
    Only a trainable ZeRO-3 role can need it, so RoleManager restores torch's own unless one is present.
    DeepSpeed 0.19: the original is kept as `InsertPostInitMethodToModuleSubClasses.linear_bk`."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as init_cls

    original = getattr(init_cls, "linear_bk", None)
    if original is None or torch.nn.functional.linear is original:
        return False
    torch.nn.functional.linear = original
    return True


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons (the process group stays), so that another set of Accelerators
    can be built in this process. accelerate 1.16: `AcceleratorState._reset_state`, `GradientState._reset_state`."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def select_plugin(plugins: dict[str, Any], name: str) -> None:
    """Mark `name`'s DeepSpeedPlugin the selected one, the others not: what accelerate's `select_deepspeed_plugin`
    does, minus its copy of the config into the global state, which RoleManager sets itself on every switch.
    accelerate 1.16: `DeepSpeedPlugin._set_selected`."""
    for n, plugin in plugins.items():
        plugin._set_selected(n == name)


@contextlib.contextmanager
def whole_weights(engine) -> Iterator[None]:
    """Every parameter of a ZeRO-3 engine gathered, and its per-module hooks lifted, for the block.

    With the hooks in place, each module's forward would release its parameters and the next
    forward gather them again: a collective per module per generated token, which hangs as soon
    as one rank stops generating before the others.
    DeepSpeed 0.19: the ZeRO-3 parameter offload's hooks, trace and module registration.
    """
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)  # trainable vs frozen engines
    root_id = offload.module.ds_id
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for p in engine.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            coordinator = offload.param_coordinator
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the recorded module order no longer holds
            # The same module ids as before: numbering on from DeepSpeed's global counter would give
            # this model ids that another ZeRO-3 role's modules already carry.
            offload._register_deepspeed_module(offload.module, count=[root_id])


DEEPSPEED_PICKLED = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")
"""The classes besides tensors and containers that DeepSpeed pickles into its checkpoint files (ZeRO-1/2/3,
fp32/bf16/fp16) of DeepSpeed 0.19; nothing else is unpickled from them."""


def deepspeed_checkpoint_classes() -> list[type]:
    """The classes of `DEEPSPEED_PICKLED` that this DeepSpeed has: what `torch.load(weights_only=True)` may build."""
    classes = []
    for dotted in DEEPSPEED_PICKLED:
        module, name = dotted.rsplit(".", 1)
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: fewer classes allowed, never more
            pass
    return classes


@contextlib.contextmanager
def forked_ranks() -> Iterator[None]:
    """Inside this block, accelerate's launcher forks its ranks from this process instead of starting
    `python -u -m MODULE ARGS` for each: a rank then skips the import of torch, transformers, DeepSpeed and
    distill this process has done already (half the CPU time of a 2-process quickstart launch on a CPU machine:
    benchmarks/rank_start.py, docs/launching.md).

    accelerate 1.10-1.16 launches one machine's ranks through `torch.distributed.run.run`, which asks
    `config_from_args` for the command; torch 2.6-2.13 gives `(LaunchConfig, sys.executable, ["-u", "-m", MODULE,
    ARGS...])`. Given a function instead of a command, torch's elastic agent starts the ranks with
    `LaunchConfig.start_method` and otherwise the same way: the environment accelerate and torchrun prepare, the
    same signals passed on, the same failures reported. Callers check `can_fork_ranks()` first.
    """
    import torch.distributed.run as distrib_run
    from torch.distributed.elastic.multiprocessing.api import MultiprocessContext

    original = distrib_run.config_from_args

    def config_from_args(args):
        config, cmd, cmd_args = original(args)
        if cmd != sys.executable or cmd_args[:2] != ["-u", "-m"]:
            return config, cmd, cmd_args  # not the launch this was written for: start it as accelerate would
        config.start_method = "fork"
        return config, run_forked_rank, cmd_args[2:]

    distrib_run.config_from_args = config_from_args
    # A forked rank that returned waits for the agent to read its return value (`_wrap`: put, then
    # `_worker_finished_event.wait()`). An agent that was signalled reads none: it passes the signal on and waits
    # 30 s in `_close`, so the ranks, stopped after their checkpoint, would wait until it kills them. It releases
    # them first; only while every rank is alive, as a rank that died inside the event's lock would block `set`.
    original_close = MultiprocessContext._close

    def close(self, death_sig, timeout=30):
        if self._pc is not None and all(p.is_alive() for p in self._pc.processes):
            self._worker_finished_event.set()
        original_close(self, death_sig, timeout)

    MultiprocessContext._close = close
    # For a forked rank that exited with a failing status, the agent logs its own traceback (where it noticed), which
    # a started rank's failure does not get: the rank has said what failed; the line without it says which rank.
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    agent_log.addFilter(_without_traceback)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or a rank writes this process's unwritten output a second time
    try:
        yield
    finally:
        distrib_run.config_from_args = original
        MultiprocessContext._close = original_close
        agent_log.removeFilter(_without_traceback)


def _without_traceback(record: logging.LogRecord) -> bool:
    # Only for a rank that exited with a status: one that raised has its traceback here and nowhere else.
    if record.exc_info and isinstance(record.exc_info[1], ProcessExitedException):
        record.exc_info = record.exc_text = None
    return True


def can_fork_ranks() -> bool:
    """Whether ranks forked from this process start as they would fresh: it runs no second thread (whose locks
    a fork copies held), has not started CUDA (which a forked process cannot use), and is on Linux. Ranks that
    see a GPU start fresh for now: forking them is measured on CPU machines only."""
    return (sys.platform.startswith("linux") and threading.active_count() == 1 and not torch.cuda.is_initialized()
            and torch.cuda.device_count() == 0)


_forked = False  # set in a rank `forked_ranks` started (`run_forked_rank`)


def run_forked_rank(module: str, *argv: str) -> None:
    """A forked rank: `python -u -m module argv` from here on, as a freshly started rank would run it."""
    global _forked
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(write_through=True)  # `python -u`
    # The launcher's own handlers were in place when it forked; a fresh process starts with the defaults.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # torch.multiprocessing asks for SIGINT when the launcher dies (torch 2.6-2.13); a started rank gets none and
    # learns of a lost launcher from its watchdog (`ranks.Watch`), which ends it with its reason.
    from torch.multiprocessing import _prctl_pr_set_pdeathsig

    _prctl_pr_set_pdeathsig(0)
    launcher = os.getppid()
    if threads := os.environ.get("OMP_NUM_THREADS"):  # set by torchrun after this process's parent imported torch
        torch.set_num_threads(int(threads))
    sys.argv = [module, *argv]
    _forked = True
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # `launch.leave`, or an exit on the way there
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if code:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    # Returning is how a forked rank says it succeeded: the agent waits for each rank's return value, and then
    # the process ends without interpreter finalization, as `launch.leave` ends a started one. Should the launcher
    # die before it reads the value, the rank would wait for it forever: it leaves instead.
    threading.Thread(target=_leave_when_orphaned, args=(launcher,), name="distill-orphan", daemon=True).start()


def _leave_when_orphaned(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(1.0)
    os._exit(0)


def in_forked_rank() -> bool:
    """Whether this process is a rank `forked_ranks` started: it must return to its launcher, not `os._exit`."""
    return _forked
