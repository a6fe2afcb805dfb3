"""Start the ranks of a tensor-parallel run with torch's own launcher, the one torchrun runs.

`launch` hands `python ARGV` to torch.distributed's elastic agent: one node, N processes, a
standalone rendezvous on 127.0.0.1, no restarts, each rank's stdout and stderr in the logs
folder. The agent stops every rank as soon as one fails; `launch` turns its ChildFailedError
into one RankFailed line naming the first failing rank and that rank's `error: ...` line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from kvlab.errors import KvlabError

TORCH_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # torch's agent turns these into SignalException


class RankFailed(KvlabError):
    """One rank of a tensor-parallel run failed; the others were stopped."""


class RankLogs(DefaultLogsSpecs):
    """torch's per-rank log files under `logs`, remembering where each rank's stderr went."""

    def __init__(self, logs: Path) -> None:
        super().__init__(log_dir=str(logs), redirects=Std.ALL)
        self.stderrs: dict[int, str] = {}

    def reify(self, envs):
        dest = super().reify(envs)
        self.stderrs = dict(dest.stderrs)
        return dest


def launch(argv: Sequence[str], world: int, *, logs: Path, device: str = "cpu") -> None:
    """Run `python ARGV` as `world` ranks with torchrun's environment; stop all if one fails.

    Each rank's output goes to `logs/<run>/attempt_0/<rank>/{stdout,stderr}.log`. When a rank
    exits non-zero RankFailed names it and its last error line. Nothing is left running when
    this returns or raises; a signal (Ctrl-C included) stops the ranks, then reaches this
    process as it would have without the launch.
    """
    if device.startswith("cuda"):
        _check_gpus(world)
    rank_logs = RankLogs(logs)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=f"kvlab-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1", max_restarts=0,
        monitor_interval=0.05, logs_specs=rank_logs,
    )
    rank_env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))}
    if not device.startswith("cuda"):
        rank_env["CUDA_VISIBLE_DEVICES"] = ""  # transformers shards onto the accelerator it sees
    try:
        with _launch_scope(rank_env):
            elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        signalled = failure.exitcode < 0  # killed: whatever it printed last is not the reason
        line = failure.message if signalled else _error_line(rank_logs.stderrs.get(failure.local_rank))
        raise RankFailed(f"rank {rank} of {world} failed (exit {failure.exitcode}): {line} "
                         f"(output of every rank in {logs})") from None
    except SignalException as err:  # the agent has stopped the ranks; now the signal's own effect
        signal.raise_signal(err.sigval)
        raise RankFailed(f"the {world} ranks were stopped by {err.sigval.name}") from None


def _check_gpus(world: int) -> None:
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < world:
        raise KvlabError(f"tp={world} on cuda needs {world} GPUs (nccl runs one rank per GPU); found {found}")


def _error_line(log: str | None) -> str:
    """The rank's `error: ...` line, else the last line of its stderr (a traceback's exception)."""
    try:
        text = Path(log).read_text(errors="replace") if log else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return lines[-1] if lines else "no output"


@contextlib.contextmanager
def _launch_scope(rank_env: dict[str, str]) -> Iterator[None]:
    """What torch's launcher changes process-wide, for the launch only.

    The ranks' variables go into os.environ (the ranks inherit it); torch's loggers stay off
    stderr (the user sees one line, the ranks' logs keep the rest). Afterwards the environment
    (torch sets variables too) and the signal handlers the agent installs are as they were.
    """
    environ = dict(os.environ)
    main = threading.current_thread() is threading.main_thread()  # the agent installs handlers only there
    handlers = {sig: signal.getsignal(sig) for sig in (getattr(signal, name, None) for name in HANDLED_SIGNALS)
                if sig is not None and main}
    loggers = {logging.getLogger(name): logging.getLogger(name).propagate for name in TORCH_LOGGERS}
    sink = logging.NullHandler()
    for logger in loggers:
        logger.addHandler(sink)
        logger.propagate = False
    os.environ.update(rank_env)
    try:
        yield
    finally:
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        os.environ.update(environ)
        for sig, handler in handlers.items():
            if handler is not None:  # None: set outside Python, and Python cannot set it back
                signal.signal(sig, handler)
        for logger, propagate in loggers.items():
            logger.removeHandler(sink)
            logger.propagate = propagate
