import json

import pytest

from kvlab.snapshot import Snapshot


def test_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("models", "capture"):
        assert command in out


@pytest.mark.parametrize("command", ["models", "capture"])
def test_each_command_has_help(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "Usage:" in out and len(out.splitlines()) > 5


def test_models_json(cli, tmp_path):
    code, _, _ = cli("models", "--json", tmp_path / "m.json")
    data = json.loads((tmp_path / "m.json").read_text())
    assert code == 0 and data["models"][0]["name"] == "smollm2"


def test_capture_then_teacher_force(cli, tmp_path):
    code, out, err = cli("capture", "-m", "tiny-llama", "-p", "hello there", "-n", "6", "--out", tmp_path / "g",
                         "--json", tmp_path / "g.json", "-q")
    assert code == 0, err
    golden = Snapshot.load(tmp_path / "g")
    assert len(golden.token_ids) == golden.n_prompt + 6
    assert json.loads((tmp_path / "g.json").read_text())["n_generated"] == 6
    code, out, err = cli("capture", "-m", "tiny-llama", "--force-tokens", tmp_path / "g", "--run", "dtype=bfloat16",
                         "--out", tmp_path / "t", "-q")
    assert code == 0, err
    test = Snapshot.load(tmp_path / "t")
    assert test.token_ids == golden.token_ids and "teacher-forced" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["capture", "-m", "tiny-llama", "-p", "x", "--run", "dtype=fp4", "--out", "{tmp}/o"], "dtype=fp4"),
        (["capture", "-m", "tiny-llama", "--out", "{tmp}/o"], "--prompt"),
        (["capture", "-m", "nope", "-p", "x", "--out", "{tmp}/o"], "unknown model"),
        (["capture", "-m", "tiny-llama", "--force-tokens", "{tmp}/missing", "--out", "{tmp}/o"], "no snapshot"),
        (["capture", "-m", "tiny-llama", "--prompt-file", "{tmp}/none.txt", "--out", "{tmp}/o"], "does not exist"),
        (["capture", "-m", "tiny-llama", "-p", "x", "-n", "0", "--out", "{tmp}/o"], "max-new-tokens"),
        (["capture", "-m", "tiny-llama", "-p", "x", "--chat", "--run", "cache=dynamic:q=1", "--out", "{tmp}/o"],
         "unknown parameter"),
        (["nonsense"], "No such command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, fragment):
    code, out, err = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "o").exists()


def test_module_entry_point_runs():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "kvlab", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "kvlab" in result.stdout


def test_json_output_is_strict_with_non_finite_figures_as_null(tmp_path):
    import math

    import torch

    from kvlab.cli.common import write_json

    write_json(str(tmp_path / "x.json"), {"a": math.inf, "b": [1.0, math.nan], "t": torch.tensor([math.nan, 2.0])})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text) == {"a": None, "b": [1.0, None], "t": [None, 2.0]}
    assert "NaN" not in text and "Infinity" not in text


def test_capture_reports_the_bytes_a_quantized_cache_holds(cli, tmp_path):
    import torch

    from kvlab.caches.mixed_layer import cache_nbytes
    from kvlab.runspec import RunSpec
    from tests.conftest import tiny

    spec = "cache=mixed:bits=4,hot=8,group=8"
    code, out, err = cli("capture", "-m", "tiny-llama", "-p", "hello there, friend", "-n", "24", "--run", spec,
                         "--out", tmp_path / "m", "--json", tmp_path / "m.json")
    assert code == 0, err
    reported = json.loads((tmp_path / "m.json").read_text())["cache_bytes"]
    snap = Snapshot.load(tmp_path / "m")
    view = sum(snap.keys(i).nbytes + snap.values(i).nbytes for i in range(snap.n_layers))

    # the oracle: the same tokens fed into a live mixed cache, which counts its own memory
    loaded, policy, ids = tiny("tiny-llama"), RunSpec.parse(spec).policy, snap.token_ids
    cache = policy.build(loaded.model, batch_size=1, max_length=len(ids))
    with policy.session(loaded.model), torch.no_grad():
        loaded.model(input_ids=torch.tensor([ids[:snap.n_prompt]]), past_key_values=cache, use_cache=True)
        for token in ids[snap.n_prompt:-1]:
            loaded.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    assert reported == cache_nbytes(cache) < view / 2
    assert f"{reported / 2**20:.2f} MiB held (dequantized view {view / 2**20:.2f} MiB)" in out

    code, _, err = cli("capture", "-m", "tiny-llama", "-p", "hello", "-n", "3", "--out", tmp_path / "d",
                       "--json", tmp_path / "d.json", "-q")
    exact = Snapshot.load(tmp_path / "d")
    assert json.loads((tmp_path / "d.json").read_text())["cache_bytes"] == sum(
        exact.keys(i).nbytes + exact.values(i).nbytes for i in range(exact.n_layers))


def test_q_is_quiet_in_every_command():
    """`-q` means --quiet wherever a command has a short -q."""
    import click

    from kvlab.cli import cli as root

    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, command

    seen = 0
    for path, command in walk(root, []):
        for param in command.params:
            if "-q" in param.opts:
                assert param.name == "quiet", (path, param.name)
                seen += 1
    assert seen >= 8


def test_models_lists_the_random_specs_and_each_one_loads(cli, tmp_path):
    from kvlab.models import load_model
    from kvlab.randommodels import FAMILIES

    code, out, err = cli("models", "--json", tmp_path / "m.json")
    assert code == 0, err
    listed = [m["name"] for m in json.loads((tmp_path / "m.json").read_text())["models"] if m["kind"] == "random"]
    assert listed == [f"random:{family}" for family in FAMILIES]
    for name in listed:
        loaded = load_model(f"{name},hidden=128,layers=1")
        assert loaded.config.num_hidden_layers == 1
    code, out, _ = cli("models")
    assert "random:llama-mha" in out
