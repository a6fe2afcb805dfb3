import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvlab.tensorfile import TensorFile, TensorFileError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool,
          torch.float8_e4m3fn]


def test_reads_what_safetensors_wrote(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{i}": (torch.randn(2, 3, 5, 4, generator=g) * 10).to(dtype) for i, dtype in enumerate(DTYPES)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5)
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "test"})
    file = TensorFile(path)
    assert file.metadata == {"format": "test"}
    with safe_open(str(path), framework="pt") as reference:
        for name in tensors:
            got = file.read(name)
            want = reference.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape == file.shape(name)
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_row_ranges(tmp_path):
    logits = torch.randn(7, 11)
    save_file({"logits": logits}, str(tmp_path / "l.safetensors"))
    file = TensorFile(tmp_path / "l.safetensors")
    assert torch.equal(file.read("logits", slice(2, 5)), logits[2:5])
    assert torch.equal(file.read("logits", slice(5, 100)), logits[5:])
    assert file.read("logits", slice(7, 9)).shape == (0, 11)


def test_bad_files_are_clear_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(100)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(TensorFileError, match="truncated"):
        TensorFile(path).read("a")
    with pytest.raises(TensorFileError, match="no tensor b"):
        TensorFile(path).read("b")
    (tmp_path / "junk").write_bytes(b"\xff" * 64)
    with pytest.raises(TensorFileError, match="not a safetensors file"):
        TensorFile(tmp_path / "junk")
