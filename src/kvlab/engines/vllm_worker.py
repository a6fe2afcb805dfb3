"""Runs inside vLLM's own Python: one teacher-forced (or greedy) run, its KV cache written to files.

This file imports nothing of kvlab (vLLM's virtual environment has no kvlab): kvlab starts it as
`python vllm_worker.py REQUEST.json` and reads what it writes into the request's `out` folder.

Only vLLM's public interfaces are used:
- `KvlabCaptureConnector`, a KV connector (`KVConnectorBase_V1`, loaded by vLLM from this file
  through `kv_transfer_config.kv_connector_module_path`, as its shared-storage example is): the
  scheduler side hands each new request's block ids to the worker side, whose `save_kv_layer`
  copies the request's blocks of every attention layer's paged cache after the layer ran;
- `LLM.apply_model` with the in-process engine: forward hooks on the attention layers record the
  K/V each layer was given before the cache write (what an fp8 cache quantized), and the scales
  each layer loaded and uses;
- `SamplingParams(prompt_logprobs=1)`: vLLM then computes the logits of every fed position; a
  forward hook on the model's `logits_processor` keeps them whole (full-vocabulary logprobs as
  Python objects would cost minutes at a few hundred positions), and each row is checked against
  the logprob vLLM reports for the token that follows.

Files written (all tensors in one `vllm.safetensors`):
- `{layer}.blocks`: the request's blocks of that layer's cache as vLLM stores them, in block
  table order (CPU backend: `[blocks, kv_heads, block_size, 2 * head_dim]`, the cache dtype;
  uint8 codes for an fp8 cache);
- `{layer}.k_in` / `.v_in`: the K/V given to the layer, `[tokens, kv_heads * head_dim]`;
- `{layer}.k_scale` / `.v_scale`: the scale buffers the layer loaded (per tensor or per head);
- `logprobs`: `[fed tokens, vocab]` float32, row j the log-probabilities of the token after token j.
And `result.json`: token ids, the greedy ids, the scales the kernel uses, versions, settings.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# This folder also holds kvlab's `vllm.py`: put it after site-packages, so `import vllm` is vLLM
# and vLLM still finds this module (the connector) by name.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(_HERE)] + [_HERE]
# the in-process engine: the connector, the hooks and this script share one process
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
)

MODULE = "vllm_worker"
_MIN_MODEL_LEN = 128
_BLOCKS: dict[str, torch.Tensor] = {}  # layer name -> the request's blocks of its cache (worker side)


class KvlabCaptureMetadata(KVConnectorMetadata):
    """The block ids of the requests scheduled for the first time in this step."""

    def __init__(self, block_ids: list[list[int]]) -> None:
        self.block_ids = block_ids


class KvlabCaptureConnector(KVConnectorBase_V1):
    """Keeps a copy of each new request's blocks of every layer; loads nothing."""

    # ---- scheduler side ----
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return KvlabCaptureMetadata([list(req.block_ids[0]) for req in scheduler_output.scheduled_new_reqs])

    # ---- worker side ----
    def start_load_kv(self, forward_context, **kwargs) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, KvlabCaptureMetadata) and meta.block_ids:
            index = torch.tensor(meta.block_ids[-1], dtype=torch.long, device=kv_layer.device)
            _BLOCKS[layer_name] = kv_layer.index_select(0, index).detach().cpu().clone()

    def wait_for_save(self) -> None:
        return None


class _Inputs:
    """Forward hooks on the attention layers: the K/V each was given in the last forward."""

    def __init__(self) -> None:
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def install(self, model) -> list[str]:
        names = []
        for name, module in model.named_modules():
            if hasattr(module, "_k_scale_float") and hasattr(module, "kv_cache_dtype"):
                module.register_forward_hook(self._hook(name))
                names.append(name)
        return names

    def _hook(self, name: str):
        def hook(module, args, output):
            self.keys[name] = args[1].detach().cpu().clone()
            self.values[name] = args[2].detach().cpu().clone()
        return hook


def _scales(model) -> dict[str, dict]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "_k_scale_float") and hasattr(module, "kv_cache_dtype"):
            out[name] = {
                "k_scale": module._k_scale.detach().cpu().float().reshape(-1).clone(),
                "v_scale": module._v_scale.detach().cpu().float().reshape(-1).clone(),
                "k_scale_used": float(module._k_scale_float),
                "v_scale_used": float(module._v_scale_float),
                "kv_cache_dtype": str(module.kv_cache_dtype),
                "isa": str(getattr(module, "isa", "")) or None,
                "num_kv_heads": int(getattr(module, "num_kv_heads", 0)),
                "head_size": int(getattr(module, "head_size", 0)),
            }
    return out


class _Logits:
    """A forward hook on the model's logits processor: the logits of every call, in order."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def install(self, model) -> bool:
        model.logits_processor.register_forward_hook(self._hook)
        return True

    def _hook(self, module, args, output) -> None:
        if output is not None:
            self.calls.append(output.detach().float().cpu().clone())


def _logprob_rows(calls: list[torch.Tensor], result, fed: list[int]) -> torch.Tensor:
    """`[len(fed), vocab]` log-probabilities: the prompt positions' rows, then the sampled one.

    vLLM computes the sampled position's logits first, then the prompt's (in chunks); each row
    must give the logprob vLLM reported for the token after it, else the order is not this one.
    """
    if len(calls) < 2 or calls[0].shape[0] != 1:
        raise RuntimeError(f"unexpected logits calls: {[tuple(c.shape) for c in calls]}")
    rows = torch.log_softmax(torch.cat(calls[1:] + calls[:1]), dim=-1)
    if rows.shape[0] != len(fed):
        raise RuntimeError(f"{rows.shape[0]} logits rows for {len(fed)} fed tokens")
    sampled = result.outputs[0].token_ids[0]
    for j in range(len(fed)):
        entry = result.prompt_logprobs[j + 1] if j + 1 < len(fed) else result.outputs[0].logprobs[0]
        token = fed[j + 1] if j + 1 < len(fed) else sampled
        if abs(float(rows[j, token]) - entry[token].logprob) > 1e-3:
            raise RuntimeError(f"logits row {j} disagrees with vLLM's logprob of token {token}")
    return rows


def run(request: dict) -> dict:
    import safetensors.torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    out = Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    prompt = request.get("prompt_ids")
    if prompt is None:  # text: tokenized by vLLM's own tokenizer, cut to max_prompt_tokens
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(request.get("tokenizer") or request["model"])
        prompt = tokenizer(request["prompt_text"])["input_ids"][: int(request["max_prompt_tokens"])]
    prompt = [int(t) for t in prompt]
    forced = request.get("forced_ids")
    total = len(prompt) + (len(forced) if forced is not None else int(request.get("max_new_tokens", 1)))
    max_model_len = max(_MIN_MODEL_LEN, -(-(total + 1) // 32) * 32)
    plain = bool(request.get("plain"))  # vLLM alone, no connector or hooks: the baseline for timings
    connector = None if plain else KVTransferConfig(
        kv_connector="KvlabCaptureConnector",
        kv_connector_module_path=MODULE,
        kv_role="kv_producer",
    )
    started = time.perf_counter()
    llm = LLM(
        model=request["model"],
        tokenizer=request.get("tokenizer") or request["model"],
        dtype=request.get("dtype", "float32"),
        kv_cache_dtype=request.get("kv_cache_dtype", "auto"),
        max_model_len=max_model_len,
        max_num_batched_tokens=max_model_len,  # the prompt in one step: the connector sees all its blocks
        max_num_seqs=1,
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
        kv_transfer_config=connector,
    )
    load_seconds = time.perf_counter() - started
    if plain:
        return _plain(llm, prompt, request, out, load_seconds)
    inputs = _Inputs()
    layer_names = llm.apply_model(inputs.install)[0]  # one result per worker: one worker
    logits = _Logits()
    llm.apply_model(logits.install)
    scales = llm.apply_model(_scales)[0]

    greedy_seconds = None
    if forced is None:
        started = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=int(request["max_new_tokens"]),
                                ignore_eos=not request.get("stop_at_eos", True))
        result = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        forced = list(result.outputs[0].token_ids)
        greedy_seconds = time.perf_counter() - started
    ids = prompt + [int(t) for t in forced]
    # the cache holds every token but the last (which is never fed), as in kvlab's capture
    fed = ids[:-1] if len(ids) > len(prompt) else ids
    _BLOCKS.clear()
    inputs.keys.clear()
    inputs.values.clear()
    logits.calls.clear()
    started = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, logprobs=1, detokenize=False)
    result = llm.generate([{"prompt_token_ids": fed}], params, use_tqdm=False)[0]
    forced_seconds = time.perf_counter() - started
    vocab = llm.llm_engine.model_config.get_vocab_size()
    tensors = {"logprobs": _logprob_rows(logits.calls, result, fed)}
    blocks = sys.modules[MODULE]._BLOCKS if MODULE in sys.modules else _BLOCKS
    for name in layer_names:
        if name not in blocks:
            raise RuntimeError(f"the KV connector saw no cache for {name}")
        tensors[f"{name}.blocks"] = blocks[name].contiguous()
        tensors[f"{name}.k_in"] = inputs.keys[name].contiguous()
        tensors[f"{name}.v_in"] = inputs.values[name].contiguous()
        tensors[f"{name}.k_scale"] = scales[name]["k_scale"].contiguous()
        tensors[f"{name}.v_scale"] = scales[name]["v_scale"].contiguous()
    for name in list(tensors):  # uint8 views of fp8 payloads: every reader knows uint8
        if tensors[name].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            tensors[name] = tensors[name].view(torch.uint8)
    safetensors.torch.save_file(tensors, str(out / "vllm.safetensors"))
    cache_config = llm.llm_engine.vllm_config.cache_config
    summary = {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "token_ids": ids,
        "fed_ids": fed,
        "n_prompt": len(prompt),
        "layers": layer_names,
        "block_size": int(cache_config.block_size),
        "cache_dtype": str(cache_config.cache_dtype),
        "scales": {name: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
                   for name, s in scales.items()},
        "vocab_size": vocab,
        "seconds": {"load": load_seconds, "greedy": greedy_seconds, "forced": forced_seconds},
        "settings": {"enforce_eager": True, "enable_prefix_caching": False,
                     "max_model_len": max_model_len, "dtype": request.get("dtype", "float32")},
    }
    (out / "result.json").write_text(json.dumps(summary))
    return summary


def _plain(llm, prompt: list[int], request: dict, out: Path, load_seconds: float) -> dict:
    """Greedy generation of max_new_tokens, and with forced ids the same tokens as one prompt, timed."""
    import vllm
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=int(request["max_new_tokens"]), ignore_eos=True,
                            detokenize=False)
    started = time.perf_counter()
    result = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    seconds = {"load": load_seconds, "generate": time.perf_counter() - started}
    forced = request.get("forced_ids")
    if forced:
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt + [int(t) for t in forced[:-1]]}],
                     SamplingParams(temperature=0.0, max_tokens=1, detokenize=False), use_tqdm=False)
        seconds["prefill"] = time.perf_counter() - started
    summary = {"vllm_version": vllm.__version__, "token_ids": prompt + list(result.outputs[0].token_ids),
               "n_prompt": len(prompt), "seconds": seconds}
    (out / "result.json").write_text(json.dumps(summary))
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_worker.py REQUEST.json", file=sys.stderr)
        return 2
    run(json.loads(Path(argv[1]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
