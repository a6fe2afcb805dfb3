"""Tensor-parallel capture on torch.distributed (gloo on CPU, nccl on CUDA).

Each rank loads the model with transformers' tensor-parallel plan (`tp_plan="auto"`, which
shards k_proj/v_proj colwise: rank r holds KV heads [r*kv/tp, (r+1)*kv/tp), the `contiguous`
layout), runs the same greedy or teacher-forced capture as `kvlab.capture`, and writes its
shard snapshot with `meta.layout`. Rank 0 gathers the shards, rebuilds the full cache with the
replica/padding checks of `kvlab.layouts.reconstruct` and writes the full snapshot.

Two ways in, one code path:
- `capture_tp(...)` outside any process group starts the N ranks (`python -m kvlab.distributed
  JOB`) with torch's launcher (`kvlab.tp_launch`), which stops them all as soon as one fails;
- started by `torchrun --nproc-per-node N -m kvlab capture ...`, each process is one rank
  and `capture_tp` runs that rank in-process.
`capture_any` is the one place that chooses between this and a capture in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from kvlab.capture import DEFAULT_TOP_K, capture
from kvlab.capture import _plan as plan_steps
from kvlab.errors import KvlabError, first_line
from kvlab.model_facts import LoadedModel, apply_attention, model_shape, quiet_transformers
from kvlab.progress import progress_bar
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot
from kvlab.tp_launch import launch

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAYOUT = "contiguous"  # what transformers' tp_plan does with k_proj / v_proj
DEFAULT_TIMEOUT_S = 600.0


# ---- the environment ---------------------------------------------------------------------
@dataclass(frozen=True)
class RankEnv:
    """This process's place in a torchrun-style launch."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> RankEnv | None:
    """The rank this process plays when started by torchrun (or `capture_tp`'s launch), else None."""
    if not all(name in os.environ for name in TORCHRUN_VARS):
        return None
    try:
        return RankEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    except ValueError:
        raise KvlabError("RANK, WORLD_SIZE and LOCAL_RANK must be integers in a torchrun environment") from None


def tp_degree(run: RunSpec, tp: int | None = None) -> int:
    """The tensor-parallel degree from `--tp`, the run spec's `tp=` and torchrun's WORLD_SIZE, which must agree."""
    given = {value for value in (tp, run.tp) if value is not None}
    if len(given) > 1:
        raise KvlabError(f"--tp {tp} and the run spec's tp={run.tp} disagree")
    env = torchrun_env()
    if env is not None and env.world_size > 1:
        if given and given != {env.world_size}:
            raise KvlabError(f"tp={given.pop()} but torchrun started {env.world_size} processes: they must match")
        return env.world_size
    return given.pop() if given else 1


# ---- the job every rank runs -------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """What each rank needs to run its part of a tensor-parallel capture (JSON-serialisable)."""

    model_dir: str
    model: dict[str, Any]  # the snapshot `model` block of the full model (spec, fingerprint, shape)
    run: str
    prompt: list[int]
    force: list[int] | None
    forced_from: dict[str, Any] | None
    max_new_tokens: int
    top_k: int
    stop_at_eos: bool
    shards: str
    out: str | None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> "Job":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class Captured:
    """The outcome of a capture, local (tp=1) or tensor-parallel, as seen by one process."""

    tp: int
    rank: int
    snapshot: "Snapshot | None"  # the full snapshot (rebuilt by rank 0 / the launcher), else None
    shards: Path | None  # the per-rank shard snapshots (None: local, or they were temporary)
    layout: str | None = None  # how the KV heads were split among the ranks (None: local)

    @property
    def check(self) -> dict[str, Any]:
        """Rank 0's replica/padding check of the rebuilt cache (`meta.reconstructed_from`)."""
        return dict(self.snapshot.meta.get("reconstructed_from", {})) if self.snapshot is not None else {}


def check_tp_fits(config, tp: int) -> None:
    """transformers' tp plan splits query and KV heads contiguously: both must divide by tp."""
    shape = model_shape(config)
    q, kv = shape["n_heads"], shape["n_kv_heads"]
    if q % tp or kv % tp:
        fits = [n for n in range(2, kv + 1) if kv % n == 0 and q % n == 0]
        hint = f"tp={' or '.join(map(str, fits))}" if fits else "only tp=1"
        raise KvlabError(f"tp={tp}: transformers' tensor-parallel plan gives every rank the same number of heads, and "
                         f"{q} heads / {kv} KV heads do not split {tp} ways; this model allows {hint}")


# ---- local or tensor parallel: chosen here only ------------------------------------------
def settle_tp(run: RunSpec, tp: int | None = None) -> RunSpec:
    """`run` with `tp=` set to `tp_degree` when that is above 1: checked before any model is loaded."""
    degree = tp_degree(run, tp)
    return replace(run, tp=degree) if degree > 1 else run


def reports_steps(run: RunSpec) -> bool:
    """Whether a capture of `run` calls `on_step` in this process: a local one, or rank 0 under torchrun."""
    env = torchrun_env()
    return tp_degree(run) == 1 or (env is not None and env.rank == 0)


def capture_any(
    model: "LoadedModel",
    tokens: Sequence[int] | None,
    run: RunSpec | None = None,
    *,
    force: "Snapshot | Sequence[int] | None" = None,
    max_new_tokens: int = 32,
    top_k: int = DEFAULT_TOP_K,
    stop_at_eos: bool = True,
    out: str | Path | None = None,
    shards: str | Path | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: str | None = None,
) -> Captured:
    """Capture `run` in this process or on its tensor-parallel ranks: the one place that chooses.

    The arguments are those of `capture_tp` (the model loaded without `tp=`; None: the run as
    loaded); with `out` the full snapshot is written there either way. `progress`: the label of a
    progress bar over the steps, drawn by the process that sees them (instead of `on_step`).
    """
    run = RunSpec() if run is None else run
    steps = len(force.token_ids) - force.n_prompt if isinstance(force, Snapshot) else max_new_tokens
    with progress_bar(steps, progress or "capture", enabled=progress is not None and reports_steps(run)) as bar:
        on_step = bar if progress is not None else on_step
        if tp_degree(run) > 1:
            return capture_tp(model, tokens, run, force=force, max_new_tokens=max_new_tokens, top_k=top_k,
                              stop_at_eos=stop_at_eos, out=out, shards=shards, on_step=on_step)
        snapshot = capture(model, tokens, run, force=force, max_new_tokens=max_new_tokens, top_k=top_k,
                           stop_at_eos=stop_at_eos, on_step=on_step)
    if out is not None:
        snapshot.save(out)
    return Captured(tp=1, rank=0, snapshot=snapshot, shards=None)


# ---- the public entry --------------------------------------------------------------------
def capture_tp(
    model: "str | LoadedModel",
    tokens: Sequence[int] | None,
    run: RunSpec,
    *,
    force: "Snapshot | Sequence[int] | None" = None,
    max_new_tokens: int = 32,
    top_k: int = 20,
    stop_at_eos: bool = True,
    out: str | Path | None = None,
    shards: str | Path | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_step: Callable[[int], None] | None = None,
) -> Captured:
    """Capture `run` (with `tp=N`) on N tensor-parallel ranks; return the rebuilt full snapshot.

    model: a model spec or a LoadedModel (its tokenizer is not needed here, its fingerprint is
        recorded). tokens, force, max_new_tokens, top_k, stop_at_eos: as in `kvlab.capture`.
    out: where rank 0 writes the full snapshot (optional). shards: the folder for the per-rank
        shard snapshots `rank{r}` (default `OUT.shards`, or a temporary folder without `out`).
    timeout_s: how long a rank waits for its peers in one collective before failing.
    on_step: per-step progress, reported only when this process runs rank 0 (under torchrun).
    Under torchrun this process runs its own rank; otherwise N ranks are started here, their
    output kept (in `SHARDS/logs`, or a temporary folder) when one fails.
    """
    from kvlab.models import load_model

    tp = tp_degree(run)
    run = replace(run, tp=tp)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, replace(run, tp=None))
    check_tp_fits(loaded.config, tp)
    prompt, golden, forced_from = _forcing(tokens, force)
    plan_steps(prompt, golden, max_new_tokens)  # bad tokens are one error here, not one per rank
    env = torchrun_env()
    if env is not None and env.world_size > 1:
        with _model_dir(loaded) as model_dir:
            job = _job(loaded, model_dir, run, prompt, golden, forced_from, max_new_tokens, top_k, stop_at_eos,
                       out, shards, timeout_s)
            return run_rank(job, env, on_step=on_step)

    with tempfile.TemporaryDirectory(prefix="kvlab-tp-") as scratch_name:
        scratch = Path(scratch_name)
        shards_dir = Path(shards) if shards is not None else (
            Path(f"{out}.shards") if out is not None else scratch / "shards")
        full_dir = Path(out) if out is not None else scratch / "full"
        with _model_dir(loaded, scratch / "model") as model_dir:
            job = _job(loaded, model_dir, run, prompt, golden, forced_from, max_new_tokens, top_k, stop_at_eos,
                       full_dir, shards_dir, timeout_s)
            job.save(scratch / "job.json")
            kept = shards is not None or out is not None
            logs = shards_dir / "logs" if kept else Path(tempfile.mkdtemp(prefix="kvlab-tp-logs-"))
            launch(["-m", "kvlab.distributed", str(scratch / "job.json")], tp, logs=logs, device=run.device or "cpu")
            shutil.rmtree(logs, ignore_errors=True)  # kept only when a rank fails
        snapshot = Snapshot.load(full_dir)
        if out is None:  # the folder goes away with the scratch space: keep the tensors in memory
            layers = [(k.clone(), v.clone()) for k, v in (snapshot.layer(i) for i in range(snapshot.n_layers))]
            snapshot = Snapshot.from_layers(layers, snapshot.meta, logits=snapshot.logits())
    return Captured(tp=tp, rank=0, snapshot=snapshot, shards=shards_dir if kept else None, layout=LAYOUT)


def _forcing(tokens, force) -> tuple[list[int] | None, list[int] | None, dict[str, Any] | None]:
    """Prompt ids, the golden token ids to force (or None), and where they came from."""
    prompt = None if tokens is None else [int(t) for t in tokens]
    if force is None:
        return prompt, None, None
    if isinstance(force, Snapshot):
        golden = force.token_ids
        if prompt is None:
            prompt = golden[: force.n_prompt]
        return prompt, golden, {"run": force.run, "path": str(force.path) if force.path else None}
    return prompt, [int(t) for t in force], None


def _job(loaded, model_dir, run, prompt, golden, forced_from, max_new_tokens, top_k, stop_at_eos, out, shards,
         timeout_s) -> Job:
    if out is not None and shards is None:
        shards = f"{out}.shards"
    if shards is None:
        raise KvlabError("a tensor-parallel capture under torchrun needs --out (or a shards folder)")
    return Job(model_dir=str(model_dir), model=loaded.describe(), run=str(run), prompt=prompt or [], force=golden,
               forced_from=forced_from, max_new_tokens=max_new_tokens, top_k=top_k, stop_at_eos=stop_at_eos,
               shards=str(shards), out=str(out) if out is not None else None, timeout_s=timeout_s)


@contextlib.contextmanager
def _model_dir(loaded: "LoadedModel", where: Path | None = None) -> Iterator[Path]:
    """A Hugging Face folder `from_pretrained` can shard: tiny models are built in memory, so save them."""
    from kvlab.tinymodels import TINY_MODELS

    if loaded.spec in TINY_MODELS:
        tmp = Path(tempfile.mkdtemp(prefix="kvlab-model-")) if where is None else where
        try:
            with quiet_transformers():
                loaded.model.save_pretrained(tmp)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if loaded.spec == "smollm2":
        from kvlab import embedded

        yield embedded.ensure_converted()
        return
    yield Path(loaded.spec).expanduser()


# ---- one rank ----------------------------------------------------------------------------
def run_rank(job: Job, env: RankEnv, on_step: Callable[[int], None] | None = None) -> Captured:
    """This process's rank: load the sharded model, capture, write the shard; rank 0 also rebuilds."""
    import torch
    import torch.distributed as dist

    run = RunSpec.parse(job.run)
    device = run.device or "cpu"
    cuda = device.startswith("cuda")
    if not cuda and torch.cuda.is_available():
        raise KvlabError("this run is on cpu but CUDA is visible, and transformers would shard onto it: "
                         "set CUDA_VISIBLE_DEVICES= for a CPU run")
    started_here = not dist.is_initialized()
    if started_here:
        if cuda:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=job.timeout_s))
    try:
        return _capture_rank(job, run, env, on_step)
    finally:
        if started_here:
            dist.destroy_process_group()


def _capture_rank(job: Job, run: RunSpec, env: RankEnv, on_step) -> Captured:
    import torch.distributed as dist

    from kvlab.layouts import make_layout, reconstruct

    model = _load_sharded(Path(job.model_dir), run, env.world_size)
    apply_attention(model, run.attn or "sdpa")
    loaded = LoadedModel(model=model, tokenizer=None, spec=job.model["spec"], fingerprint=job.model["fingerprint"])
    layout = make_layout(LAYOUT, env.world_size, job.model["n_heads"], job.model["n_kv_heads"])
    extra = {"forced_from": job.forced_from} if job.forced_from else None
    with quiet_transformers():
        snap = capture(loaded, job.prompt or None, run, force=job.force, max_new_tokens=job.max_new_tokens,
                       top_k=job.top_k, stop_at_eos=job.stop_at_eos, on_step=on_step if env.rank == 0 else None,
                       extra_meta=extra)
    snap.meta["model"] = dict(job.model)
    snap.meta["layout"] = layout.rank_meta(env.rank, seq_len=snap.shape(0)[2] if snap.n_layers else 0)
    shards = Path(job.shards)
    snap.save(shards / f"rank{env.rank}")
    if env.rank == 0:
        _remove_stale_shards(shards, env.world_size)

    layers = [snap.layer(i) for i in range(snap.n_layers)]
    gathered: list[Any] | None = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(layers, gathered, dst=0)
    if env.rank != 0:
        return Captured(tp=env.world_size, rank=env.rank, snapshot=None, shards=shards, layout=LAYOUT)
    result = reconstruct(gathered, layout)
    full = result.to_snapshot(snap.meta, logits=snap.logits())
    for problem in result.problems:
        print(f"warning: {problem.message()}", file=sys.stderr)
    if job.out is not None:
        full.save(job.out)
    return Captured(tp=env.world_size, rank=0, snapshot=full, shards=shards, layout=LAYOUT)


def _remove_stale_shards(shards: Path, tp: int) -> None:
    """Shard snapshots `rank{r}` with r >= tp left by an earlier, wider run would not fit this one."""
    for entry in shards.glob("rank*"):
        suffix = entry.name.removeprefix("rank")
        if suffix.isdigit() and int(suffix) >= tp and (entry / "meta.json").is_file():
            shutil.rmtree(entry, ignore_errors=True)


def _load_sharded(model_dir: Path, run: RunSpec, tp: int):
    """`from_pretrained` with transformers' tensor-parallel plan over the current process group."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=run.torch_dtype, local_files_only=True,
                distributed_config=DistributedConfig(tp_plan="auto", tp_size=tp),
            )
    except (OSError, ValueError, RuntimeError) as err:
        raise KvlabError(f"cannot load {model_dir} with tp_plan=auto over {tp} ranks: {first_line(err)}") from None
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kvlab.distributed JOB`: one rank started by `launch` (or by hand with torchrun's variables)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = torchrun_env()
    rank = env.rank if env is not None else "?"
    try:
        if len(argv) != 1 or env is None:
            raise KvlabError("usage: RANK=.. WORLD_SIZE=.. LOCAL_RANK=.. MASTER_ADDR=.. MASTER_PORT=.. "
                             "python -m kvlab.distributed JOB.json")
        run_rank(Job.load(argv[0]), env)
    except KvlabError as err:
        print(f"error: rank {rank}: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except Exception as err:  # a bug or a collective torn down by a failing peer: keep the trace in the log
        traceback.print_exc()
        print(f"error: rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
