"""RunSpec: how a model runs, as one short string shared by the CLI and the Python API.

`dtype=bfloat16,attn=sdpa,cache=mixed:bits=4,hot=128,tp=2,device=cpu`
`engine=llama.cpp,cache=q8_0,fa=on`
`engine=vllm,kv_cache_dtype=fp8,scales=runs/scales`

The cache policy's own parameters follow its name after a colon; a comma-separated item
belongs to the cache policy until the next top-level key. Keys left out mean "as the model
is loaded" (`resolve`) or the defaults (`with_defaults`).

`engine` names who runs the model: transformers (the default, left out of the string) or
another implementation of the same model (`kvlab.engines`). An engine run takes its own keys:
`cache` is then the engine's cache type (`f16`, `q8_0`, ...), `fa` and `rope_base` are its
settings, and transformers' keys (`dtype`, `attn`, `tp`, `device`) do not apply. vLLM spells
its cache type `kv_cache_dtype=auto|fp8` and takes `scales=DIR` (fp8 KV scales).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvlab.errors import KvlabError
from kvlab.params import ParamError

if TYPE_CHECKING:
    import torch

    from kvlab.caches.registry import CachePolicy

KEYS = ("engine", "dtype", "attn", "cache", "tp", "device", "fa", "rope_base", "kv_cache_dtype", "scales")
TRANSFORMERS_KEYS = ("dtype", "attn", "cache", "tp", "device")
ENGINE_KEYS = ("cache", "fa", "rope_base", "scales")  # the keys an engine run takes (each engine some)
DTYPES = ("float32", "float16", "bfloat16")
DEFAULTS = {"dtype": "float32", "attn": "sdpa", "cache": "dynamic", "tp": 1, "device": "cpu"}
TRANSFORMERS = "transformers"
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_PREFERRED_ATTN = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class RunSpecError(KvlabError):
    """A run spec that cannot be parsed or names something that does not exist."""


def attention_names() -> list[str]:
    """Attention kernels a run may name: transformers' registered ones plus kvlab's."""
    from transformers import AttentionInterface

    registered = [name for name in AttentionInterface._global_mapping if not name.startswith("paged")]
    return list(_PREFERRED_ATTN) + [n for n in sorted(registered) if n not in _PREFERRED_ATTN]


@dataclass(frozen=True)
class RunSpec:
    dtype: str | None = None
    attn: str | None = None
    cache: "CachePolicy | None" = None
    tp: int | None = None
    device: str | None = None
    engine: str | None = None  # None: transformers
    fa: bool | None = None  # engine runs: flash attention
    rope_base: float | None = None  # engine runs: RoPE base override (llama.cpp's rope_freq_base)
    scales: str | None = None  # engine=vllm: fp8 KV scales (a `kvlab scales calibrate` folder or a checkpoint)

    # ---- parsing -------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, check_device: bool = True) -> "RunSpec":
        """Parse and validate a spec where it enters (the CLI, a public entry point, a recorded run);
        with `check_device`, a device this torch cannot use is refused here, before any model is
        loaded (a recorded run, read to describe it, is parsed without)."""
        if not text or not text.strip():
            return cls()
        values: dict[str, str] = {}
        cache_items: list[str] = []
        in_cache = False  # items after `cache=NAME:` belong to the policy until the next key
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            key, sep, value = (p.strip() for p in item.partition("="))
            if sep and key in KEYS:
                if key in values:
                    raise RunSpecError(f"run spec: {key!r} given twice in {text!r}")
                values[key] = value
                in_cache = key == "cache"
                if in_cache:
                    name, _, first = value.partition(":")
                    values[key] = name.strip()
                    cache_items = [first.strip()] if first.strip() else []
            elif in_cache:
                cache_items.append(item)
            else:
                raise RunSpecError(f"run spec: unknown key {key!r} in {item!r}; allowed: {', '.join(KEYS)}")
        spec = cls._from_strings(values, cache_items)
        if check_device and spec.device is not None:
            check_device_available(spec.device)
        return spec

    @classmethod
    def _from_strings(cls, values: dict[str, str], cache_items: list[str]) -> "RunSpec":
        engine = values.get("engine")
        if engine is not None and engine != TRANSFORMERS:
            return cls._engine_from_strings(engine, values, cache_items)
        for key in (*ENGINE_KEYS[1:], "kv_cache_dtype"):
            if key in values:
                owner = "engine=vllm" if key in ("scales", "kv_cache_dtype") else "engine=llama.cpp"
                raise RunSpecError(f"run spec: {key}= is an engine setting; use it with {owner}")
        dtype = values.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise RunSpecError(f"run spec: dtype={dtype} is not one of {', '.join(DTYPES)}")
        attn = values.get("attn")
        if attn is not None:
            allowed = attention_names()
            if attn not in allowed:
                raise RunSpecError(f"run spec: attn={attn} is not one of {', '.join(allowed)}")
        tp = values.get("tp")
        tp_value = None
        if tp is not None:
            if not tp.isdigit() or int(tp) < 1:
                raise RunSpecError(f"run spec: tp={tp} is not a positive integer")
            tp_value = int(tp)
        device = values.get("device")
        if device is not None and not _DEVICE.match(device):
            raise RunSpecError(f"run spec: device={device} is not cpu, cuda, cuda:N or mps")
        cache = None
        if "cache" in values:
            from kvlab.caches import make_policy

            try:
                cache = make_policy(values["cache"], cache_items)
            except ParamError as err:
                raise RunSpecError(f"run spec: {err}") from None
        return cls(dtype=dtype, attn=attn, cache=cache, tp=tp_value, device=device,
                   engine=None if engine is None else TRANSFORMERS)

    @classmethod
    def _engine_from_strings(cls, engine: str, values: dict[str, str], cache_items: list[str]) -> "RunSpec":
        from kvlab.engines.settings import CACHE_KEY, engine_cache, engine_names, engine_settings

        if engine not in engine_names():
            raise RunSpecError(f"run spec: engine={engine} is not one of {', '.join(engine_names())}")
        takes = engine_settings(engine)
        foreign = [k for k in values if k not in ("engine", *takes)]
        if foreign:
            shown = [k for k in takes if k != "cache" or engine not in CACHE_KEY]
            raise RunSpecError(f"run spec: {foreign[0]}= does not apply to engine={engine}; "
                               f"it takes {', '.join(shown)}")
        if "kv_cache_dtype" in values:
            if "cache" in values:
                raise RunSpecError("run spec: cache= and kv_cache_dtype= name the same setting; give one")
            values = {**values, "cache": values["kv_cache_dtype"]}
        scales = values.get("scales") or None
        if cache_items:
            raise RunSpecError(f"run spec: engine={engine} cache types take no parameters ({', '.join(cache_items)})")
        try:
            cache = engine_cache(engine, values["cache"]) if "cache" in values else None
        except ParamError as err:
            raise RunSpecError(f"run spec: {err}") from None
        fa = None
        if "fa" in values:
            if values["fa"] not in ("on", "off"):
                raise RunSpecError(f"run spec: fa={values['fa']} is not on or off")
            fa = values["fa"] == "on"
        rope_base = None
        if "rope_base" in values:
            try:
                rope_base = float(values["rope_base"])
            except ValueError:
                rope_base = -1.0
            if not 0 < rope_base < float("inf"):
                raise RunSpecError(f"run spec: rope_base={values['rope_base']} is not a positive number")
        return cls(cache=cache, engine=engine, fa=fa, rope_base=rope_base, scales=scales)

    @property
    def engine_name(self) -> str:
        """Who runs the model: `transformers` or an engine of `kvlab.engines`."""
        return self.engine or TRANSFORMERS

    @property
    def is_engine(self) -> bool:
        return self.engine_name != TRANSFORMERS

    # ---- completing ----------------------------------------------------------------------
    def with_defaults(self) -> "RunSpec":
        """Every unset key at kvlab's default (float32, sdpa, dynamic, tp=1, cpu; an engine's own)."""
        if self.is_engine:
            from kvlab.engines.settings import engine_cache, engine_settings

            fa = self.fa if self.fa is not None or "fa" not in engine_settings(self.engine_name) else True
            return replace(self, cache=self.cache or engine_cache(self.engine_name, None), fa=fa)
        changes = {key: default for key, default in DEFAULTS.items() if getattr(self, key) is None}
        if "cache" in changes:
            from kvlab.caches import make_policy

            changes["cache"] = make_policy(changes["cache"])
        return replace(self, **changes)

    def resolve(self, model) -> "RunSpec":
        """Fill unset keys from a loaded model; raise if a set key contradicts it."""
        if self.is_engine:
            raise RunSpecError(f"engine={self.engine} runs outside transformers: capture it with "
                               "kvlab capture --engine (kvlab.engines)")
        actual = {
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(model.device),
            "attn": getattr(model.config, "_attn_implementation", None) or "eager",
        }
        changes = {}
        for key in ("dtype", "device"):
            want = getattr(self, key)
            if want is None:
                changes[key] = actual[key]
            elif not _same(key, want, actual[key]):
                raise RunSpecError(f"the run asks for {key}={want} but the model is loaded with {key}={actual[key]}; "
                                   "load it with kvlab.load_model(spec, run)")
        if self.attn is None:
            changes["attn"] = actual["attn"]
        return replace(self, **changes).with_defaults()

    # ---- reading -------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype or DEFAULTS["dtype"])

    @property
    def policy(self) -> "CachePolicy":
        return self.cache if self.cache is not None else self.with_defaults().cache

    def __str__(self) -> str:
        parts = []
        for key in KEYS:
            value = getattr(self, key, None)  # kv_cache_dtype= is read into cache
            if value is not None and not (key == "engine" and value == TRANSFORMERS):
                parts.append(f"{self._key_text(key)}={value_text(key, value)}")
        return ",".join(parts)

    def _key_text(self, key: str) -> str:
        """The key as this run writes it (an engine may spell its cache type otherwise)."""
        if key == "cache" and self.is_engine:
            from kvlab.engines.settings import CACHE_KEY

            return CACHE_KEY.get(self.engine_name, key)
        return key


def check_device_available(device: str) -> None:
    """Refuse a device this torch build or machine does not have (`cuda` on a CPU-only torch)."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch" if torch.version.cuda is None else "no CUDA device is visible"
            raise RunSpecError(f"run spec: device={device} but this torch ({torch.__version__}) cannot use CUDA: "
                               f"{build}; use device=cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise RunSpecError(f"run spec: device={device} but only {torch.cuda.device_count()} CUDA device(s) "
                               "are visible")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise RunSpecError(f"run spec: device={device} but MPS is not available here; use device=cpu")


def value_text(key: str, value) -> str:
    """How a key's value reads in a run spec string."""
    if key == "cache":
        return value.spec()
    if key == "fa":
        return "on" if value else "off"
    if key == "rope_base":
        return f"{value:g}"
    return str(value)


def _same(key: str, want: str, actual: str) -> bool:
    if key != "device":
        return want == actual
    import torch

    a, b = torch.device(want), torch.device(actual)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
