"""The README's shell commands, run as written, in README order, in one temporary folder.

Every command of the README's ```sh blocks has a rule in RULES, keyed by its exact text, so a
new or changed command fails here until someone says how it is checked: run (fast), `slow` (the
default model, or minutes), an engine (`engine`: llama.cpp, or vLLM in its own Python), or not
run at all (installs and builds). A command must exit as RULES says (0 unless given). Files the
README assumes its reader has (a task file, a quantized checkpoint, another tool's shards, a
llama.cpp dump) are made here before the first command that reads them; a command whose input
comes from an earlier command that did not run here (deselected, or skipped) is skipped.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KVLAB = ".venv/bin/kvlab"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def readme_commands() -> list[str]:
    """Each command of the README's sh blocks: continuation lines joined, comments dropped, `&&` split."""
    commands = []
    for block in readme_blocks("sh"):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                commands.append(shlex.join(tokens[:cut]))
                tokens = tokens[cut + 1:]
    return commands


@dataclass(frozen=True)
class Rule:
    how: str = "run"  # run | slow | llama.cpp | vllm | not run
    needs: tuple[str, ...] = ()  # what earlier commands wrote
    exit: int = 0
    extra: tuple[str, ...] = ()  # options appended (the last one wins): a command that takes hours as written
    home: bool = False  # KVLAB_HOME in the test folder: `kvlab hw` writes its figures there
    why: str = ""


INSTALLS = Rule("not run", why="installs into .venv (pip, apt, a llama.cpp build): this suite runs inside it")
PROMPT = "'What is the capital of France?'"
RULES: dict[str, Rule] = {
    "make demo": INSTALLS,
    "make test": INSTALLS,
    f"{KVLAB} diff --model smollm2 --chat --prompt {PROMPT} --golden dtype=float32 --test dtype=bfloat16 "
    "--test dtype=float16 --test attn=eager --max-new-tokens 32 --out runs/study": Rule("slow"),
    f"{KVLAB} diff runs/study/golden runs/study/test1-dtype-bfloat16 --json diff.json --report diff.html":
        Rule("slow", needs=("runs/study",)),
    f"{KVLAB} models": Rule(),
    f"{KVLAB} capture --model smollm2 --chat --prompt {PROMPT} --max-new-tokens 32 --out runs/golden": Rule("slow"),
    f"{KVLAB} capture --model smollm2 --run dtype=bfloat16 --force-tokens runs/golden --out runs/bf16":
        Rule("slow", needs=("runs/golden",)),
    f"{KVLAB} capture --model smollm2 --chat --prompt ... --run cache=mixed:bits=4,hot=128,scheme=kivi,group=32 "
    "--out runs/mixed": Rule("slow"),
    f"{KVLAB} capture --model smollm2 --run cache=mixed:scheme=q8_0 --force-tokens runs/golden --out runs/q8":
        Rule("slow", needs=("runs/golden",)),
    "make install-engines": INSTALLS,
    f"{KVLAB} diff --model smollm2 --chat --prompt {PROMPT} -n 32 --ignore-eos --golden dtype=float32 "
    "--test dtype=float16 --test engine=llama.cpp,cache=f16 --test engine=llama.cpp,cache=q8_0 "
    "--test engine=llama.cpp,cache=q4_0": Rule("llama.cpp"),
    f"{KVLAB} capture --engine llama.cpp --model smollm2 --run cache=q8_0,fa=on --force-tokens runs/golden "
    "--out runs/llama-q8": Rule("llama.cpp", needs=("runs/golden",)),
    f"{KVLAB} trace record --engine llama.cpp --model smollm2 --layers 0,5 --steps 8 --run cache=q8_0 "
    "--out runs/llama.gguf": Rule("llama.cpp"),
    f"{KVLAB} trace check runs/llama.gguf": Rule("llama.cpp", needs=("runs/llama.gguf",)),
    f"{KVLAB} scales calibrate --model smollm2 --granularity head --tp 3 --out runs/scales": Rule("slow"),
    f"{KVLAB} scales extract path/to/quantized-checkpoint --tp-size 3 --out kv_cache_scales.json": Rule(),
    f"{KVLAB} scales check runs/scales/kv_cache_scales.json --model smollm2 --tp 3":
        Rule("slow", needs=("runs/scales",)),
    f"{KVLAB} capture --model smollm2 --run cache=fp8:scales=runs/scales/kv_cache_scales.json "
    "--force-tokens runs/golden --out runs/fp8": Rule("slow", needs=("runs/scales", "runs/golden")),
    f"{KVLAB} scales export runs/scales --into smollm2 --out runs/ckpt-fp8": Rule("slow", needs=("runs/scales",)),
    f"{KVLAB} scales verify runs/ckpt-fp8 --engine vllm": Rule("vllm", needs=("runs/ckpt-fp8",)),
    "make .venv-vllm": INSTALLS,
    f"{KVLAB} capture --engine vllm --model smollm2 --run kv_cache_dtype=fp8,scales=runs/scales "
    "--force-tokens runs/golden --out runs/vllm-fp8": Rule("vllm", needs=("runs/scales", "runs/golden")),
    f"{KVLAB} diff --model smollm2 --chat --prompt {PROMPT} --golden dtype=float32 --test engine=vllm "
    "--test engine=vllm,kv_cache_dtype=fp8,scales=runs/ckpt-fp8 --out runs/vllm-study":
        Rule("vllm", needs=("runs/ckpt-fp8",)),
    f"{KVLAB} trace record --model smollm2 --layers 0,5 --steps 8 --out runs/trace.gguf": Rule("slow"),
    f"{KVLAB} trace check runs/trace.gguf --json runs/check.json --plot runs/check.png":
        Rule("slow", needs=("runs/trace.gguf",)),
    f"{KVLAB} trace check dump.gguf --layout llama.cpp": Rule(),
    f"{KVLAB} trace record --model smollm2 --layers 0,5 --steps 8 --out runs/mixed.gguf "
    "--run cache=mixed:bits=4,hot=8,group=8": Rule("slow"),
    f"{KVLAB} capture --model smollm2 --prompt ... --tp 3 --out runs/tp3": Rule("slow"),
    "torchrun --nproc-per-node 3 -m kvlab -- capture --model smollm2 --prompt ... --run tp=3 --out runs/tp3":
        Rule("slow"),
    f"{KVLAB} reconstruct runs/tp3.shards --out runs/rebuilt": Rule("slow", needs=("runs/tp3.shards",)),
    f"{KVLAB} reconstruct nxdi_dump/ --layout auto --heads 24 --kv-heads 6 --tp 8 --pattern nxdi --out runs/nxdi "
    "--json report.json": Rule(),
    f"{KVLAB} hw --device cpu": Rule(home=True),
    f"{KVLAB} bench decode --model random:llama-mha,hidden=1024,layers=8 --batch 4 --prompt-len 512 --gen-len 16 "
    "--tier disk --auto --json runs/decode.json": Rule("slow", needs=("home/hw_metrics.json",), home=True),
    f"{KVLAB} fuse precompute --model smollm2 --tasks tasks.jsonl --store runs/chunks --chunk-tokens 512 "
    "--prefix 'You answer from the documents.' --surprisal --workers 2": Rule("slow"),
    f"{KVLAB} fuse store stats runs/chunks": Rule("slow", needs=("runs/chunks",)),
    f"{KVLAB} fuse run --model smollm2 --store memory:// --chunks-file docs.txt "
    "--question 'Who founded the company?' --strategy a3 --rate 0.15": Rule("slow"),
    f"{KVLAB} fuse run --model smollm2 --store runs/chunks --task-file tasks.jsonl --id q7 "
    "--prefix 'You answer from the documents.' --strategy cacheblend:check_layer=2 --rate 0.15 "
    "--evict snapkv:capacity=1024,kernel=5,pool=avg": Rule("slow", needs=("runs/chunks",)),
    f"{KVLAB} fuse eval --model smollm2 --task mixed --n 48 --strategies reuse,cacheblend,a3,epic,surprisal "
    "--rates 0.05,0.15,0.3 --store memory:// --report runs/fusion.html --json runs/fusion.json":
        Rule("slow", extra=("--n", "1", "--chunks", "2", "--chunk-tokens", "128"),
             why="48 tasks of eight 512-token documents take hours on a CPU; one of two short ones runs the same code"),
    f"{KVLAB} fuse tasks --model smollm2 --task mixed --n 48 --out tasks.jsonl": Rule("slow"),
    f"{KVLAB} fuse explain --model smollm2 --task-file tasks.jsonl --id needle-code3-0-0 --strategy a3 "
    "--rate 0.15 --store runs/chunks --report runs/explain.html": Rule("slow", needs=("runs/chunks",)),
}


# ---- what the README assumes its reader has ---------------------------------------------------

def _task_file(path: Path) -> None:
    """The README's own task file example."""
    (block,) = readme_blocks("jsonl")
    path.write_text(block)


def _chunks_file(path: Path) -> None:
    """The README's own chunks file example."""
    (block,) = readme_blocks("text")
    path.write_text(block)


def _ammo_checkpoint(folder: Path, tp: int = 3, n_layers: int = 4) -> None:
    """A TensorRT-LLM/AMMO export: its JSON config and one scales file per rank."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"layers": [{"decoder_type": "llama"}], "dtype": "float16",
                                                    "tensor_parallel": tp}))
    for rank in range(tp):
        save_file({f"transformer.layers.{i}.attention.kv_cache_scaling_factor": torch.tensor([0.01 * (rank + i + 1)])
                   for i in range(n_layers)}, str(folder / f"rank{rank}.safetensors"))


def _nxdi_dump(folder: Path, n_layers: int = 2) -> None:
    """NxDI's shards of a 24-head, 6-KV-head model at tp 8: kv_mgr.past_key_values.{2*layer} K, +1 V."""
    from kvlab.layouts import make_layout, shard

    gen = torch.Generator().manual_seed(0)
    full = [(torch.randn(1, 6, 5, 8, generator=gen), torch.randn(1, 6, 5, 8, generator=gen)) for _ in range(n_layers)]
    folder.mkdir(parents=True)
    for rank, layers in enumerate(shard(full, make_layout("auto", 8, 24, 6))):
        save_file({f"kv_mgr.past_key_values.{2 * i + j}": t.contiguous() for i, kv in enumerate(layers)
                   for j, t in enumerate(kv)}, str(folder / f"rank{rank}.safetensors"))


def _llama_cpp_dump(path: Path) -> None:
    shutil.copy(ROOT / "tests" / "trace" / "fixtures" / "llamacpp" / "f16.gguf", path)


GIVEN = {"tasks.jsonl": _task_file, "docs.txt": _chunks_file, "path/to/quantized-checkpoint": _ammo_checkpoint,
         "nxdi_dump/": _nxdi_dump, "dump.gguf": _llama_cpp_dump}


# ---- running them ----------------------------------------------------------------------------

def _marks(rule: Rule) -> list:
    if rule.how == "slow":
        return [pytest.mark.slow]
    if rule.how in ("llama.cpp", "vllm"):
        return [pytest.mark.engine, pytest.mark.slow]
    return []


def _params() -> list:
    params = []
    for i, command in enumerate(readme_commands()):
        rule = RULES.get(command)
        tokens = shlex.split(command)
        words = [Path(tokens[0]).name, *itertools.takewhile(re.compile("[a-z]+").fullmatch, tokens[1:])]
        params.append(pytest.param(command, marks=_marks(rule) if rule else [], id=f"{i:02d}-{'-'.join(words)}"))
    return params


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert [c for c in commands if c not in RULES] == [], "README commands without a rule in RULES"
    assert [c for c in RULES if c not in commands] == [], "rules for commands the README no longer has"


@pytest.mark.parametrize("command", _params())
def test_readme_command(command, folder, monkeypatch, capsys):
    if command not in RULES:
        pytest.fail(f"no rule for the README command {command!r}: add one to RULES")
    rule = RULES[command]
    if rule.how == "not run":
        pytest.skip(rule.why)
    tokens = shlex.split(command)
    _need_engine(rule.how)
    _need_redis(tokens)
    missing = [need for need in rule.needs if not (folder / need).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)}: written by an earlier README command that did not run here")
    for name, make in GIVEN.items():
        if name in tokens and not (folder / name).exists():
            make(folder / name)
    monkeypatch.chdir(folder)
    if rule.home:
        monkeypatch.setenv("KVLAB_HOME", str(folder / "home"))
    if tokens[0] == KVLAB:
        from kvlab.cli import main

        code = main([*tokens[1:], *rule.extra])
        out = capsys.readouterr()
        output = out.out[-3000:] + out.err[-3000:]
    else:
        assert tokens[0] == "torchrun"
        done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), *tokens[1:], *rule.extra],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _python_path()})
        code, output = done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
    assert code == rule.exit, f"{command}\nexit {code}, not {rule.exit}:\n{output}"


def _python_path() -> str:
    """This checkout's kvlab first, also in the processes torchrun starts."""
    return os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])


def _need_engine(how: str) -> None:
    if how == "llama.cpp":
        from tests.engines.helpers import need_llama_cpp

        need_llama_cpp()
    elif how == "vllm":
        from kvlab.engines import vllm

        if not vllm.available():
            pytest.skip("vLLM's Python not found (make .venv-vllm, or set KVLAB_VLLM_PYTHON)")


def _need_redis(tokens: list[str]) -> None:
    """A command on a Redis store needs that server; without one it is skipped."""
    for url in (urlparse(t) for t in tokens if t.startswith(("redis://", "rediss://"))):
        try:
            socket.create_connection((url.hostname or "localhost", url.port or 6379), timeout=1).close()
        except OSError:
            pytest.skip(f"no Redis server at {url.hostname}:{url.port}")
