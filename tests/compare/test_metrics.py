import math

import pytest
import torch

from kvlab.compare import error_maps, first_mismatch, kl_divergence, tensor_errors


def test_identical_tensors_have_no_error():
    x = torch.randn(1, 2, 5, 8)
    e = tensor_errors(x, x.clone())
    assert e.max_abs == 0 and e.rel_l2 == 0 and e.cosine == pytest.approx(1.0)


def test_hand_worked_values():
    g = torch.tensor([3.0, 4.0])
    t = torch.tensor([3.0, 5.0])
    e = tensor_errors(g, t)
    assert e.max_abs == 1.0
    assert e.rel_l2 == pytest.approx(1 / 5)
    assert e.cosine == pytest.approx((9 + 20) / (5 * math.sqrt(34)))


def test_cancelling_errors_are_seen_element_wise():
    g = torch.tensor([1.0, 1.0])
    t = torch.tensor([2.0, 0.0])  # same sum, different tensor
    assert tensor_errors(g, t).max_abs == 1.0


def test_error_maps_locate_a_single_perturbation():
    g = torch.randn(1, 3, 6, 4)
    t = g.clone()
    t[0, 2, 4, 1] += 0.5
    maps = error_maps(g, t)
    assert maps["max_abs"].shape == (1, 3, 6)
    assert torch.nonzero(maps["max_abs"]).tolist() == [[0, 2, 4]]
    assert maps["cosine"][0, 2, 4] < 1 and maps["cosine"][0, 0, 0] == pytest.approx(1.0)


def test_zero_rows_have_cosine_one_and_shape_mismatch_raises():
    z = torch.zeros(1, 1, 2, 4)
    assert error_maps(z, z)["cosine"].eq(1).all()
    with pytest.raises(ValueError, match="shape mismatch"):
        tensor_errors(torch.zeros(2), torch.zeros(3))


def test_kl_and_first_mismatch():
    logits = torch.randn(4, 10)
    assert kl_divergence(logits, logits).abs().max() < 1e-12
    assert (kl_divergence(logits, logits.flip(-1)) >= 0).all()
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1


def test_whole_tensor_errors_of_zero_tensors():
    z = torch.zeros(2, 3)
    assert tensor_errors(z, z).to_dict() == {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
    assert tensor_errors(z, torch.ones(2, 3)).cosine == 0.0
