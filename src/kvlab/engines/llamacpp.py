"""llama.cpp as a test engine: run a GGUF teacher-forced (or greedily) and record a kvlab Snapshot.

Everything goes through llama.cpp's own interfaces (llama-cpp-python's low-level ctypes
bindings), nothing is patched:
- the model is loaded with `use_extra_bufts = False` (extra buffers only repack weights; on a
  CPU that reports AMX under a VM that forbids it, every decode crashes without this);
- tokens are fed with `llama_decode` (the prompt as one batch, then one token per step, as
  `kvlab.capture` does), and each step's last-position logits read with `llama_get_logits_ith`;
- the final cache comes from the sequence state API (`llama_state_seq_get_data`), read by
  `llamacpp_state` and turned into transformers' layout by `ggml_rows`;
- the eval callback sees the graph of the first decode, which says whether this llama.cpp
  Hadamard-rotates K and V (nodes multiplying by `attn_inp_k_rot` / `attn_inp_v_rot`).

Snapshot tensors: `layers.{i}.keys` / `.values` `[1, kv_heads, seq, head_dim]` in transformers'
channel order (float16 for an f16 cache, float32 otherwise), and for a quantized cache the raw
ggml blocks beside them, `layers.{i}.keys.q` uint8 `[1, kv_heads, seq, bytes per head]`, as
llama.cpp stores them (Hadamard-rotated, GGUF channel order). `meta.json` gets `engine`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlab.engines import LLAMA_CPP, engine_run
from kvlab.engines.ggml_rows import deinterleave, raw_heads, rows_to_float, to_heads, type_name, unrotate
from kvlab.errors import KvlabError
from kvlab.model_facts import LoadedModel
from kvlab.runspec import RunSpec
from kvlab.snapshot import Snapshot

PACKAGE = "llama-cpp-python"
PINNED_VERSION = "0.3.36"
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
_LOG_ERROR = 4
_KEPT_LOG_LINES = 8


class EngineUnavailable(KvlabError):
    """llama-cpp-python is not installed (or not importable) here."""


def available() -> bool:
    try:
        require()
    except EngineUnavailable:
        return False
    return True


def require():
    """The llama_cpp module, or one line saying how to install it."""
    try:
        import llama_cpp
    except (ImportError, OSError) as err:
        raise EngineUnavailable(f"engine=llama.cpp needs {PACKAGE}=={PINNED_VERSION}: pip install 'kvlab[llamacpp]' "
                                "(builds llama.cpp from source, 15-25 minutes once) "
                                f"({type(err).__name__}: {err})") from None
    return llama_cpp


@dataclass(frozen=True)
class Settings:
    """How llama.cpp runs: cache type (K and V), flash attention, RoPE base override, threads."""

    cache: str = "f16"
    flash_attn: bool = True
    rope_base: float | None = None
    threads: int | None = None

    @classmethod
    def from_run(cls, run: RunSpec | None, threads: int | None = None) -> "Settings":
        spec = engine_run(run, LLAMA_CPP).with_defaults()
        return cls(cache=spec.policy.spec(), flash_attn=bool(spec.fa), rope_base=spec.rope_base, threads=threads)

    def validate(self) -> None:
        if self.cache not in GGML_TYPES:
            raise KvlabError(f"llama.cpp cache type {self.cache} is not one of {', '.join(GGML_TYPES)}")
        if self.cache not in ("f32", "f16") and not self.flash_attn:
            raise KvlabError(f"cache={self.cache} needs fa=on: llama.cpp quantizes the V cache only under flash "
                             "attention")


# ---- the model ---------------------------------------------------------------------------------

@dataclass
class GgufModel:
    """A GGUF file and what a snapshot records about the model in it."""

    path: Path
    spec: str
    describe: dict[str, Any]
    tokenizer: Any = None  # the transformers tokenizer of the same model, when kvlab has one

    def encode(self, text: str, chat: bool = False) -> list[int] | None:
        """Token ids through the transformers tokenizer (None: let llama.cpp tokenize)."""
        if self.tokenizer is None:
            if chat:
                raise KvlabError(f"{self.spec}: --chat needs the model's chat template; kvlab has it only for "
                                 "smollm2 (give the templated prompt as text)")
            return None
        return LoadedModel.encode(self, text, chat=chat)  # type: ignore[arg-type]


def resolve_model(spec: str) -> GgufModel:
    """`smollm2` (the GGUF that kvlab's default model is converted from) or a path to a `.gguf` file."""
    from kvlab import embedded
    from kvlab.models import DEFAULT_MODEL

    if spec == DEFAULT_MODEL:
        from kvlab.models import load_model

        loaded = load_model(DEFAULT_MODEL)  # the converted weights: the fingerprint golden runs record
        return GgufModel(embedded.gguf_path(), DEFAULT_MODEL, loaded.describe(), loaded.tokenizer)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GgufModel(path, spec, {"spec": spec, "fingerprint": None, "gguf": str(path)})
    raise KvlabError(f"engine=llama.cpp runs GGUF files: --model {DEFAULT_MODEL} or a path to a .gguf file "
                     f"(got {spec!r})")


# ---- one llama.cpp context -----------------------------------------------------------------------

class _Logs:
    """llama.cpp's log lines go here instead of stderr; errors are kept for the message."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, level, text, _user) -> None:
        if level == _LOG_ERROR and text:
            self.errors = (self.errors + [text.decode(errors="replace").strip()])[-_KEPT_LOG_LINES:]

    def last(self) -> str:
        return f" (llama.cpp: {self.errors[-1]})" if self.errors else ""


_LOGS = _Logs()
_LOG_CALLBACK = None


def _quiet(lib) -> None:
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lib.llama_log_callback(_LOGS)
        lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        lib.llama_backend_init()


class Session:
    """A loaded GGUF and one context with the run's settings; `close()` frees both.

    eval_callback: a `ggml_graph.GraphCallback` (or None) that sees every graph node.
    """

    def __init__(self, path: Path, settings: Settings, n_ctx: int, n_batch: int,
                 eval_callback=None) -> None:
        settings.validate()
        self.lib = lib = require()
        _quiet(lib)
        self.settings = settings
        self.model = self.ctx = None
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = False  # repacked weights crash on CPUs that report AMX under a VM
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise KvlabError(f"llama.cpp cannot load {path}{_LOGS.last()}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_layers = lib.llama_model_n_layer(self.model)
        self.n_heads = lib.llama_model_n_head(self.model)
        self.n_kv_heads = lib.llama_model_n_head_kv(self.model)
        self.head_dim = lib.llama_model_n_embd(self.model) // self.n_heads
        self.architecture = self.meta("general.architecture")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = max(n_ctx, 16)
        cparams.n_batch = cparams.n_ubatch = max(n_batch, 1)  # the prompt in one ubatch, like transformers
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = session_threads(settings)
        cparams.type_k = cparams.type_v = GGML_TYPES[settings.cache]
        cparams.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn
                                   else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.rope_freq_base = float(settings.rope_base or 0.0)
        cparams.no_perf = True
        self._callback = eval_callback
        if eval_callback is not None:
            cparams.cb_eval = eval_callback.c_function
            cparams.cb_eval_user_data = None
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise KvlabError(f"llama.cpp cannot create a context with cache={settings.cache}, "
                             f"fa={'on' if settings.flash_attn else 'off'}{_LOGS.last()}")

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed `tokens` after what the sequence holds; the last position's logits (float32)."""
        lib = self.lib
        array = (lib.llama_token * len(tokens))(*tokens)
        batch = lib.llama_batch_get_one(array, len(tokens))
        status = lib.llama_decode(self.ctx, batch)
        if self._callback is not None:
            self._callback.check()
        if status != 0:
            raise KvlabError(f"llama_decode failed with status {status}{_LOGS.last()}")
        ptr = lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def sequence_state(self) -> bytes:
        lib = self.lib
        size = lib.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self.ctx, buf, size, 0)
        if written != size:
            raise KvlabError(f"llama_state_seq_get_data wrote {written} of {size} bytes{_LOGS.last()}")
        return bytes(buf)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RotationWatch:
    """Watches the first decode's graph for llama.cpp's Hadamard rotation of K and V."""

    def __init__(self) -> None:
        from kvlab.engines.ggml_graph import GraphCallback

        self.sources: set[str] = set()
        self.callback = GraphCallback(self._want, lambda node, ptr: None)

    def _want(self, node) -> bool:
        if node.op == "MUL_MAT":
            self.sources.update(node.src)
        return False

    @property
    def rotates_k(self) -> bool:
        return "attn_inp_k_rot" in self.sources

    @property
    def rotates_v(self) -> bool:
        return "attn_inp_v_rot" in self.sources


# ---- capture -----------------------------------------------------------------------------------

def capture(
    model: str | GgufModel,
    tokens: Sequence[int] | torch.Tensor | None,
    run: RunSpec | None = None,
    *,
    force: Snapshot | Sequence[int] | None = None,
    max_new_tokens: int = 32,
    top_k: int = 20,
    stop_at_eos: bool = True,
    on_step: Callable[[int], None] | None = None,
    prompt_text: str | None = None,
    threads: int | None = None,
) -> Snapshot:
    """Run llama.cpp on `tokens` (or teacher-forced on `force`) and return its cache as a Snapshot.

    model: `smollm2` or a `.gguf` path (or a resolved `GgufModel`).
    run: a parsed `engine=llama.cpp,cache=f16|f32|q8_0|q4_0,fa=on|off,rope_base=X` (None: the defaults).
    prompt_text: when `tokens` is None and nothing is forced, llama.cpp tokenizes this text.
    Same loop as `kvlab.capture.capture` (`kvlab.decode.run_steps`, its callback `StepLog`): the
    prompt in one decode, then one token per step;
    the last fed token is not decoded, so the cache holds all token ids but the last.
    """
    from kvlab.capture import StepLog, _plan, run_meta
    from kvlab.decode import run_steps

    spec = engine_run(run, LLAMA_CPP).with_defaults()
    settings = Settings.from_run(spec, threads=threads)
    settings.validate()
    gguf = resolve_model(model) if isinstance(model, str) else model
    if tokens is None and force is None:
        if prompt_text is None:
            raise KvlabError("capture needs prompt tokens or a golden run to force")
        tokens = gguf.encode(prompt_text)
        if tokens is None:
            tokens = tokenize(gguf.path, prompt_text)
    prompt, forced, n_steps = _plan(tokens, force, max_new_tokens)
    watch = RotationWatch()
    log = StepLog(top_k, on_step)
    with Session(gguf.path, settings, n_ctx=len(prompt) + n_steps, n_batch=len(prompt),
                 eval_callback=watch.callback) as session:
        if gguf.describe.get("n_layers") is None:
            gguf.describe.update(family=session.architecture, n_layers=session.n_layers, n_heads=session.n_heads,
                                 n_kv_heads=session.n_kv_heads, head_dim=session.head_dim,
                                 vocab_size=session.n_vocab)
        if session.architecture != "llama":
            raise KvlabError(f"kvlab reads llama.cpp caches of LLaMA-architecture GGUFs; {gguf.path.name} is "
                             f"{session.architecture!r}")

        def forward(feed: torch.Tensor) -> tuple[torch.Tensor, None]:
            logits = session.decode(feed[0].tolist())
            watch.callback.enabled = False  # the first decode's graph told all there is
            return torch.from_numpy(logits)[None], None

        ends = _EndOfGeneration(session) if forced is None and stop_at_eos else ()
        ids = prompt + run_steps(forward, prompt, n_steps, forced=forced, eos=ends, callback=log).ids
        layers, extras, layout = _read_cache(session, n_positions=len(ids) - 1,
                                             rotated=(watch.rotates_k, watch.rotates_v))
        engine = {
            "name": LLAMA_CPP,
            "package": PACKAGE,
            "version": require().__version__,
            "gguf": str(gguf.path),
            "architecture": session.architecture,
            "settings": asdict(settings) | {"threads": session_threads(settings)},
            "use_extra_bufts": False,
            "cache": layout,
        }
    meta = run_meta(gguf.describe, str(spec), ids, len(prompt), log.greedy, log.top_ids, log.top_values,
                    force=force, forced=forced is not None, engine=engine)
    return Snapshot.from_layers(layers, meta, extras=extras, logits=log.logits())


class _EndOfGeneration:
    """The vocabulary's end-of-generation tokens, as the container the decode loop asks."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __contains__(self, token: object) -> bool:
        return self.session.is_end(int(token))


def tokenize(path: Path, text: str) -> list[int]:
    """Prompt token ids by llama.cpp's own tokenizer (its vocabulary only is loaded)."""
    lib = require()
    _quiet(lib)
    mparams = lib.llama_model_default_params()
    mparams.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise KvlabError(f"llama.cpp cannot load {path}{_LOGS.last()}")
    try:
        vocab = lib.llama_model_get_vocab(model)
        raw = text.encode()
        buf = (lib.llama_token * (len(raw) + 16))()
        n = lib.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
        if n < 0:
            raise KvlabError("llama.cpp could not tokenize the prompt")
        return list(buf[:n])
    finally:
        lib.llama_model_free(model)


def session_threads(settings: Settings) -> int:
    return settings.threads or torch.get_num_threads() or os.cpu_count() or 1


def _read_cache(session: Session, n_positions: int, rotated: tuple[bool, bool]):
    """K/V per layer in transformers' layout from the sequence state, raw blocks beside quantized ones."""
    from kvlab.engines.llamacpp_state import parse_sequence_state

    n_kv, dim = session.n_kv_heads, session.head_dim
    state = parse_sequence_state(session.sequence_state(), n_layers=session.n_layers, v_elements=n_kv * dim)
    order = np.argsort(np.asarray(state.positions), kind="stable")
    positions = [state.positions[i] for i in order]
    if positions != list(range(n_positions)):
        raise KvlabError(f"llama.cpp's cache holds positions {positions[:4]}...{positions[-2:]} "
                         f"({len(positions)}), expected 0..{n_positions - 1}")
    layers, extras = [], {}
    for i, layer in enumerate(state.layers):
        pair = []
        for which, ggml_type, rows, rot, is_key in (("keys", layer.k_type, layer.k_rows, rotated[0], True),
                                                    ("values", layer.v_type, layer.v_rows, rotated[1], False)):
            rows = rows[order]
            values = rows_to_float(rows, ggml_type, n_kv * dim)
            if rot:
                values = unrotate(values)
            tensor = to_heads(values, n_kv, dim)
            if is_key:
                tensor = deinterleave(tensor)
            if ggml_type == GGML_TYPES["f16"]:
                tensor = tensor.to(torch.float16)  # exact: the rows were float16
            pair.append(tensor)
            if ggml_type not in (GGML_TYPES["f32"], GGML_TYPES["f16"]):
                extras[f"layers.{i}.{which}.q"] = raw_heads(rows, n_kv)
        layers.append((pair[0], pair[1]))
    first = state.layers[0]
    layout = {
        "k_type": type_name(first.k_type),
        "v_type": type_name(first.v_type),
        "v_transposed": state.v_trans,
        "k_rotated": rotated[0],
        "v_rotated": rotated[1],
        "raw_blocks": "layers.{i}.keys.q: ggml blocks per (KV head, position) as llama.cpp stores them"
                      + (" (Hadamard-rotated" if any(rotated) else " (") + ", GGUF channel order for keys)",
    }
    return layers, extras, layout
