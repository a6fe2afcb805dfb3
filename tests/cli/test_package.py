import json

import click
import pytest
import torch

from kvlab.snapshot import Snapshot


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command and subcommand below `group`, with the words that reach it."""
    found = []
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        found.append((path, command))
        if isinstance(command, click.Group):
            found += _command_paths(command, path)
    return found


def _all_commands():
    from kvlab.cli import cli as root

    return _command_paths(root)


def test_help_lists_every_command():
    from kvlab.cli import cli as root

    paths = [path for path, _ in _all_commands()]
    assert {"models", "capture", "diff", "reconstruct", "scales", "trace", "fuse"} <= {p[0] for p in paths}
    assert ("scales", "check") in paths and len(paths) >= 15
    assert root.commands  # the walk starts from the real root group


@pytest.mark.parametrize("path", [path for path, _ in _all_commands()], ids=" ".join)
def test_each_command_and_subcommand_has_help(cli, path):
    command = dict(_all_commands())[path]
    code, out, err = cli(*path, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"Usage: kvlab {' '.join(path)} ")
    words = " ".join(out.split())
    summary = " ".join((command.help or "").split("\n\n")[0].split())
    assert summary and summary[:40] in words  # the command's own description, not a stub
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert any(opt in out for opt in param.opts), (param.opts, out)
    if isinstance(command, click.Group):
        for name in command.commands:
            assert f"  {name} " in out or f"  {name}\n" in out, (name, out)
    code, root_out, _ = cli("--help")
    assert code == 0 and (f"  {path[0]} " in root_out or f"  {path[0]}\n" in root_out)


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
    assert "teacher-forced" in out
    assert test.meta["teacher_forced"] is True and test.meta["forced_from"]["path"] == str(tmp_path / "g")
    assert test.run == "dtype=bfloat16,attn=sdpa,cache=dynamic,tp=1,device=cpu"
    # the same run through the library, teacher-forced on the golden snapshot, is the oracle
    import kvlab
    from tests.conftest import tiny

    want = kvlab.capture(tiny("tiny-llama", "dtype=bfloat16"), None, "dtype=bfloat16", force=golden)
    assert test.greedy_ids == want.greedy_ids and torch.equal(test.logits(), want.logits())
    assert test.greedy_ids == [int(row.argmax()) for row in test.logits()]
    for i in range(golden.n_layers):
        assert test.keys(i).dtype == torch.bfloat16 and torch.equal(test.keys(i), want.keys(i))
        assert torch.equal(test.values(i), want.values(i))
        # a bfloat16 run of the golden tokens: close to the float32 cache, not equal to it
        error = (test.keys(i).float() - golden.keys(i)).norm() / golden.keys(i).norm()
        assert 0 < error < 0.25


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
