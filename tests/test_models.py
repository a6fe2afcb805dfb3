import os
import subprocess
import sys

import pytest
import torch

from kvlab.errors import KvlabError
from kvlab.models import list_models, load_model
from tests.conftest import TINY_FAMILIES, tiny


def test_list_names_the_default_and_the_tiny_models():
    names = [spec.name for spec in list_models()]
    assert names[0] == "smollm2"
    for name in TINY_FAMILIES + ["tiny-llama-32l"]:
        assert name in names


def test_tiny_models_are_seeded_and_differ_by_family():
    again = load_model("tiny-llama")
    first = tiny("tiny-llama")
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    prints = {tiny(name).fingerprint for name in TINY_FAMILIES}
    assert len(prints) == len(TINY_FAMILIES)


def test_tiny_families_have_their_features():
    llama, mha, qwen, mistral = (tiny(n).config for n in TINY_FAMILIES)
    assert llama.num_key_value_heads < llama.num_attention_heads
    assert mha.num_key_value_heads == mha.num_attention_heads
    attn = tiny("tiny-qwen2").model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert mistral.model_type == "mistral" and mistral.num_key_value_heads == 1
    assert tiny("tiny-llama-32l").config.num_hidden_layers == 32


def test_fingerprint_ignores_the_run_dtype_but_sees_a_changed_weight():
    base = tiny("tiny-llama")
    assert load_model("tiny-llama", "dtype=bfloat16").fingerprint == base.fingerprint
    changed = load_model("tiny-llama")
    with torch.no_grad():
        changed.model.model.layers[2].mlp.down_proj.weight[0, 0] += 1.0
    from kvlab.models import model_fingerprint

    assert model_fingerprint(changed.model) != base.fingerprint


def test_local_folder_loads_with_the_same_fingerprint(tmp_path):
    base = tiny("tiny-qwen2")
    base.model.save_pretrained(tmp_path / "m")
    base.tokenizer.save_pretrained(tmp_path / "m")
    local = load_model(str(tmp_path / "m"))
    assert local.fingerprint == base.fingerprint
    assert local.encode("abc") == base.encode("abc")


def test_unknown_models_are_one_line_errors(tmp_path):
    with pytest.raises(KvlabError, match="unknown model 'nope'.*smollm2.*tiny-llama"):
        load_model("nope")
    with pytest.raises(KvlabError, match="no config.json"):
        load_model(str(tmp_path))


def test_chat_encoding_uses_the_template():
    loaded = tiny("tiny-llama")
    plain = loaded.encode("hi")
    chat = loaded.encode("hi", chat=True)
    assert loaded.decode(chat) == "<|user|>hi</s><|assistant|>"
    assert loaded.decode(plain).endswith("hi")


@pytest.mark.slow
def test_two_processes_convert_the_default_model_once(tmp_path):
    """Start two conversions at once into an empty home: one converts, the other waits."""
    env = {**os.environ, "KVLAB_HOME": str(tmp_path)}
    code = (
        "from kvlab import embedded; import time; t=time.time(); p=embedded.ensure_converted(); "
        "print(p, round(time.time()-t, 1))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folders = list((tmp_path / "models").iterdir())
    visible = [f for f in folders if not f.name.startswith(".")]
    assert len(visible) == 1 and (visible[0] / "kvlab-complete").is_file()
    assert not [f for f in folders if f.name.endswith(".tmp")]
    env_loaded = subprocess.run(
        [sys.executable, "-c", "import kvlab; print(kvlab.load_model('smollm2').fingerprint)"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert env_loaded.returncode == 0 and len(env_loaded.stdout.strip()) == 16


def test_low_precision_runs_keep_rotary_frequencies_in_float32():
    # like from_pretrained(dtype=bfloat16): only weights are cast; a bfloat16 inv_freq puts the
    # keys of late positions off by radians
    low = load_model("tiny-llama", "dtype=bfloat16").model
    rotary = low.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, tiny("tiny-llama").model.model.rotary_emb.inv_freq)
    assert low.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16


def test_the_default_model_ships_as_the_4_bit_gguf_the_readme_describes():
    from collections import Counter

    from gguf import GGUFReader

    from kvlab import embedded

    types = Counter(t.tensor_type.name for t in GGUFReader(embedded.gguf_path()).tensors)
    assert set(types) == {"Q4_1", "Q8_0", "F32"} and types["Q8_0"] == 1
    assert types["Q4_1"] == 7 * 30  # q, k, v, o, gate, up, down of each of the 30 layers
