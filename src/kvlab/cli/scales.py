"""`kvlab scales calibrate / extract / check`: FP8 KV-cache scales for vLLM and compressed-tensors."""

from __future__ import annotations

import click

from kvlab.cli.common import (console, json_and_quiet, json_option, make_table, model_option, output_dir, output_file,
                              write_json)
from kvlab.cli.scales_vllm import export_command, verify_command
from kvlab.errors import KvlabError


@click.group("scales")
def scales_group() -> None:
    """FP8 KV-cache scales: calibrate them on a model, extract them from quantized checkpoints
    (TensorRT-LLM/AMMO, compressed-tensors, ModelOpt), check a vLLM kv_cache_scales.json.

    Convention: dequantize x = q * scale, scale = amax / fp8_max. Run a model with the scales
    through the cache policy `cache=fp8:scales=PATH`.
    """


@scales_group.command("calibrate")
@model_option
@click.option("--run", "run_text", default="", metavar="SPEC", help="Run spec to calibrate under (dtype, attn, device).")
@click.option("--data", default=None, metavar="FILE", help="Calibration text file (default: the built-in text).")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="Number of text windows.")
@click.option("--seq-len", type=click.IntRange(min=8), default=512, show_default=True, help="Tokens per window (at most).")
@click.option("--granularity", type=click.Choice(["tensor", "head"]), default="tensor", show_default=True,
              help="One scale per layer, or one per layer and KV head.")
@click.option("--fp8", "fp8_format", type=click.Choice(["e4m3fn", "e5m2", "e4m3fnuz"]), default="e4m3fn",
              show_default=True, help="FP8 format the scales are for (scale = amax / its max).")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel degree for kv_cache_scales.json (one entry per rank).")
@click.option("--format", "out_format", type=click.Choice(["vllm", "compressed-tensors", "both"]), default="both",
              show_default=True, help="What to write into --out.")
@click.option("--chat/--no-chat", default=None, help="Wrap each window in the chat template (default: if the model has one).")
@click.option("--out", "-o", required=True, metavar="DIR", callback=output_dir, help="Folder for the files.")
@json_and_quiet
def calibrate_command(model_spec, run_text, data, samples, seq_len, granularity, fp8_format, tp, out_format, chat,
                      out, json_path, quiet) -> None:
    """Run calibration text through the model, track K/V amax per layer (and KV head), write scales.

    vllm: kv_cache_scales.json (vLLM's schema; per-head scales folded to each rank's heads
    under the tensor-parallel layout for --tp; one scale serves K and V). compressed-tensors:
    kv_cache_scales.safetensors (model.layers.{i}.self_attn.k_scale / v_scale) and
    kv_cache_scheme.json, the block for config.json's quantization_config.
    """
    from kvlab.models import load_model
    from kvlab.progress import progress_bar
    from kvlab.scales.api import calibrate_to_files

    loaded = load_model(model_spec, run_text, progress=not quiet)
    with progress_bar(samples, "calibrate", enabled=not quiet) as advance:
        result = calibrate_to_files(loaded, out, data=data, samples=samples, seq_len=seq_len, granularity=granularity,
                                    fp8_format=fp8_format, tp=tp, fmt=out_format, chat=chat, on_sample=advance)
    cal, scales = result.calibration, result.scales
    summary = {"model": model_spec, "fp8_format": fp8_format, "granularity": granularity, **result.to_dict()}
    _warn(result.warnings)
    con = console(json_path)
    con.print(f"[bold]{model_spec}[/bold]: {cal.n_samples} samples, {cal.n_tokens} tokens of {cal.source}")
    table = make_table(f"K/V amax and {fp8_format} scales ({granularity})",
                       ("layer", "K amax", "V amax", "K scale", "V scale"))
    for i, (ka, va, ks, vs) in enumerate(zip(cal.key_amax, cal.value_amax, scales.keys, scales.values)):
        table.add_row(str(i), _floats(ka), _floats(va), _floats(ks), _floats(vs))
    con.print(table)
    for path in result.files:
        con.print(f"wrote {path}")
    write_json(json_path, summary)


@scales_group.command("extract")
@click.argument("checkpoint", metavar="CHECKPOINT_DIR")
@click.option("--tp-size", type=click.IntRange(min=1), default=None, help="Expected tensor-parallel size (checked; also folds per-head scales).")
@click.option("--load-format", type=click.Choice(["auto", "safetensors", "npz", "pt"]), default="auto", show_default=True)
@click.option("--model-type", default=None,
              help="The model's type (e.g. llama), for a checkpoint that does not name it.")
@click.option("--out", "-o", default=None, metavar="FILE", callback=output_file, help="Output file (default: CHECKPOINT_DIR/kv_cache_scales.json).")
@json_option
def extract_command(checkpoint, tp_size, load_format, model_type, out, json_path) -> None:
    """Extract KV scales from a quantized checkpoint into vLLM's kv_cache_scales.json.

    Reads TensorRT-LLM/AMMO per-rank files (rank = digits after "rank" in each file's name;
    kv_cache_scaling_factor tensors; npz names use ':'), compressed-tensors (k_scale/v_scale,
    k_proj.output_scale), ModelOpt (k_proj.k_scale) and older single-scale (self_attn.kv_scale)
    checkpoints. Missing or duplicate ranks or layers, a tp mismatch, non-scalar scales, no scales
    at all and scales that are not e4m3fn FP8 scales (an INT8 kv_cache_scheme) are errors; no
    model type, or a tp vLLM cannot run the model at, is a warning.
    """
    from kvlab.scales.api import extract_to_file

    found, path = extract_to_file(checkpoint, out, tp_size=tp_size, load_format=load_format, model_type=model_type)
    summary = {"checkpoint": checkpoint, **found.to_dict(out=path)}
    _warn(found.warnings)
    con = console(json_path)
    con.print(f"{checkpoint}: {found.kind}, model_type {found.model_type!r}, tp {found.tp}, "
              f"{found.n_layers} layers, from {len(found.files)} file(s)")
    for rank in sorted(found.ranks):
        values = list(found.ranks[rank].values())
        con.print(f"  rank {rank}: scales {min(values):.6g} .. {max(values):.6g}")
    for note in found.notes:
        con.print(f"[yellow]note:[/yellow] {note}")
    con.print(f"wrote {path}")
    write_json(json_path, summary)


@scales_group.command("check")
@click.argument("file", metavar="FILE")
@click.option("--model", "-m", "model_spec", default=None,
              help="Take the layer count, model type and head counts from this model.")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Number of hidden layers expected.")
@click.option("--tp", type=click.IntRange(min=1), default=None, help="Tensor-parallel size expected.")
@click.option("--model-type", default=None, help="model_type expected (default with --model: the model's).")
@click.option("--no-model-type", "no_model_type", is_flag=True,
              help="No model type is expected: accept model_type null (vLLM and SGLang pass one and reject null).")
@json_option
def check_command(file, model_spec, layers, tp, model_type, no_model_type, json_path) -> None:
    """Validate a kv_cache_scales.json; list what vLLM's schema rejects and what kvlab's own rules do.

    vLLM's schema (with the context vLLM passes: tp size, layer count, model type): model_type key
    present and a string (null is rejected, as vLLM and SGLang pass the model's type, unless
    --no-model-type), kv_cache.dtype float8_e4m3fn, rank and layer keys that read as integers,
    every rank 0..tp-1 and every layer 0..L-1, scales that read as numbers. kvlab's rules on top:
    finite positive numeric scales, keys written plainly ("7", not "07"), no duplicate keys, and
    with --model a tp vLLM can run the model at.
    """
    from kvlab.scales.api import check_file

    if model_spec is not None and layers is not None:
        raise click.UsageError("give --model or --layers, not both")
    if no_model_type and model_type is not None:
        raise click.UsageError("give --model-type or --no-model-type, not both")
    result = check_file(file, tp=tp, n_layers=layers, model_type=model_type, expect_model_type=not no_model_type,
                        model=model_spec)
    con = console(json_path)
    where = ", ".join(f"{k}={v}" for k, v in result.context.items())
    con.print(f"{file}" + (f" ({where})" if where else "") + ": "
              + ("valid under vLLM's schema and kvlab's rules" if result.ok else _counts(result)))
    for title, items in (("vLLM's schema rejects:", result.vllm_violations),
                         ("kvlab's own rules:", result.kvlab_violations)):
        if items:
            con.print(f" {title}")
        for problem in items:
            con.print(f"  - {problem}", markup=False)
    write_json(json_path, {"file": file, **result.to_dict()})
    if not result.ok:
        raise KvlabError(f"{file}: {_counts(result)}")


def _counts(result) -> str:
    parts = []
    if result.vllm_violations:
        parts.append(f"{len(result.vllm_violations)} that vLLM's schema rejects")
    if result.kvlab_violations:
        parts.append(f"{len(result.kvlab_violations)} of kvlab's own rules")
    return f"{len(result.violations)} violation(s): " + ", ".join(parts)


def _warn(warnings: list[str]) -> None:
    """Each warning on stderr, one line each: the file was written, but an engine would refuse it."""
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


def _floats(t) -> str:
    return " ".join(f"{x:.4g}" for x in t.reshape(-1).tolist())


scales_group.add_command(export_command)
scales_group.add_command(verify_command)

COMMANDS = [scales_group]
