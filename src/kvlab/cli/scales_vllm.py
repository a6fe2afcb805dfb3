"""`kvlab scales export / verify`: a checkpoint vLLM loads with fp8 scales, and proof that it used them."""

from __future__ import annotations

import click

from kvlab.cli.common import (console, engine_python_option, json_and_quiet, json_option, make_table, read_prompt,
                              write_json)
from kvlab.errors import KvlabError


@click.command("export")
@click.argument("scales", metavar="SCALES")
@click.option("--into", "model_dir", required=True, metavar="MODEL_DIR",
              help="The unquantized model folder (config.json + safetensors); `smollm2` for the default model.")
@click.option("--out", "-o", required=True, metavar="CHECKPOINT",
              help="Checkpoint folder to write (replaced if it is one).")
@click.option("--granularity", type=click.Choice(["tensor", "head"]), default=None,
              help="Per tensor (per-head scales folded to their maximum) or per head (default: as SCALES are).")
@json_and_quiet
def export_command(scales, model_dir, out, granularity, json_path, quiet) -> None:
    """Merge SCALES into MODEL_DIR as a compressed-tensors checkpoint vLLM loads with kv_cache_dtype=fp8.

    SCALES: a `kvlab scales calibrate` folder, a .safetensors of k_scale/v_scale tensors, a
    kv_cache_scales.json or a quantized checkpoint. The checkpoint gets
    model.layers.{i}.self_attn.k_scale / v_scale and a complete quantization_config
    (quant_method compressed-tensors, config_groups {}, kv_cache_scheme).
    """
    from kvlab.scales.vllm_export import export_checkpoint

    result = export_checkpoint(scales, _model_folder(model_dir), out, granularity=granularity)
    if not quiet:
        how = "hard-linked" if result.linked else "copied"
        console(json_path).print(f"wrote {result.path}: {result.scales.n_layers} layers of {result.scales.granularity} "
                                 f"scales (compressed-tensors), model weights {how}")
    write_json(json_path, result.to_dict())


@click.command("verify")
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--engine", type=click.Choice(["vllm"]), default="vllm", show_default=True,
              help="The engine that must use the scales.")
@engine_python_option
@click.option("--prompt-file", default=None, metavar="FILE", help="Text to run (default: the built-in essays).")
@click.option("--tokens", type=click.IntRange(min=8), default=256, show_default=True, help="Tokens of it to run.")
@json_option
def verify_command(checkpoint, engine, prompt_file, tokens, json_path) -> None:
    """Run vLLM on CHECKPOINT with an fp8 KV cache and prove, per layer, which scale its stored codes used.

    A layer passes when its codes are those of the checkpoint's scale (and vLLM loaded that
    scale) and the scale fits this text's range; `fallback 1.0` is vLLM silently ignoring the
    checkpoint's scales. Exits non-zero when any layer fails.
    """
    from kvlab.scales.vllm_verify import verify_checkpoint

    text = read_prompt(None, prompt_file, required=False)
    result = verify_checkpoint(checkpoint, text=text, max_tokens=tokens)
    con = console(json_path)
    con.print(f"{checkpoint}: vLLM {result.vllm_version}, kv_cache_dtype fp8, {result.granularity} scales, "
              f"{result.n_tokens} tokens")
    for note in result.notes:
        con.print(f"[yellow]note:[/yellow] {note}")
    table = make_table("per layer: the checkpoint's scale, the share of stored codes it explains, the share of "
                       "e4m3's range it uses here",
                       ("layer", "status", "K scale", "K codes", "K range", "V scale", "V codes", "V range"))
    for layer in result.layers:
        row = [str(layer.layer), layer.status]
        for side in (layer.k, layer.v):
            codes = "scale 1.0" if side.status == "fallback 1.0" else f"{side.match_checkpoint:.1%}"
            row += [f"{side.expected:.3g}", codes, f"{side.range_use:.0%}"]
        table.add_row(*row)
    con.print(table)
    write_json(json_path, result.to_dict())
    failed = [layer for layer in result.layers if not layer.ok]
    if failed:
        kinds = sorted({layer.status for layer in failed})
        raise KvlabError(f"vLLM did not use {checkpoint}'s scales as given in {len(failed)} of {len(result.layers)} "
                         f"layers ({', '.join(kinds)}; layers {', '.join(str(x.layer) for x in failed[:8])}"
                         + ("..." if len(failed) > 8 else "") + ")")
    con.print(f"all {len(result.layers)} layers stored codes under the checkpoint's scales")


def _model_folder(spec: str):
    """`smollm2`: kvlab's converted folder of the default model; anything else: a folder path."""
    from pathlib import Path

    from kvlab.models import DEFAULT_MODEL

    if spec == DEFAULT_MODEL:
        from kvlab import embedded

        return embedded.ensure_converted()
    return Path(spec)
