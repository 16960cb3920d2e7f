import math

import pytest
import torch
from ttach.base import Merger

from ttach_instance.merge import MERGE_MODES, TTACH_MODES, merge_outputs


def ttach_merge(outputs, mode):
    merger = Merger(type=mode, n=outputs.shape[1])
    for v in outputs.unbind(1):
        merger.append(v)
    return merger.result


@pytest.mark.parametrize("mode", TTACH_MODES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 5, 6)])
def test_equals_ttach_merger_on_positive_values(mode, k, shape):
    g = torch.Generator().manual_seed(k)
    outputs = torch.rand((shape[0], k) + shape[1:], generator=g) + 0.05
    expected = ttach_merge(outputs, mode)
    got = merge_outputs(outputs, mode)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)  # same operations, same order: bit for bit


@pytest.mark.parametrize("mode", ["mean", "sum", "max", "min"])
def test_equals_ttach_on_logits(mode):
    outputs = torch.randn(6, 4, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(merge_outputs(outputs, mode), ttach_merge(outputs, mode))


def test_hand_values():
    x = torch.tensor([[[1.0, 4.0]], [[9.0, 16.0]]]).transpose(0, 1)  # (B=1, k=2, 2)
    assert merge_outputs(x, "mean").tolist() == [[5.0, 10.0]]
    assert merge_outputs(x, "sum").tolist() == [[10.0, 20.0]]
    assert merge_outputs(x, "max").tolist() == [[9.0, 16.0]]
    assert merge_outputs(x, "min").tolist() == [[1.0, 4.0]]
    assert merge_outputs(x, "gmean").tolist() == [[3.0, 8.0]]
    assert merge_outputs(x, "tsharpen").tolist() == [[2.0, 3.0]]


def test_gmean_tsharpen_negative_values_are_sign_preserving():
    x = torch.tensor([[[-2.0], [8.0]]])  # (1, 2, 1)
    assert torch.isnan(ttach_merge(x, "gmean")).all()  # ttach issue #4
    assert merge_outputs(x, "gmean").tolist() == [[-4.0]]  # real root of the product -16
    x = torch.tensor([[[-4.0], [9.0]]])
    assert torch.isnan(ttach_merge(x, "tsharpen")).all()
    assert merge_outputs(x, "tsharpen").tolist() == [[0.5]]  # (-2 + 3) / 2
    x = torch.tensor([[[-8.0], [-1.0], [-1.0]]])
    assert merge_outputs(x, "gmean").tolist() == [[-2.0]]  # cube root of -8
    # Where ttach is defined (an even number of negatives), it is ttach's number.
    x = torch.tensor([[[-1.0, 2.0], [-4.0, 8.0]]])
    assert torch.equal(merge_outputs(x, "gmean"), ttach_merge(x, "gmean"))
    logits = torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(0))
    for mode in MERGE_MODES[:-1]:
        assert torch.isfinite(merge_outputs(logits, mode)).all()


def test_weighted_softmin_hand_computed():
    outputs = torch.tensor([[[4.0], [8.0]]])
    losses = torch.tensor([[0.0, math.log(3.0)]])  # softmax(-losses) = (3/4, 1/4)
    assert merge_outputs(outputs, "weighted", losses=losses).item() == pytest.approx(5.0)
    w0 = 1 / (1 + 3 ** -0.5)  # temperature 2: softmax(0, -ln3 / 2)
    expected = w0 * 4 + (1 - w0) * 8
    assert merge_outputs(outputs, "weighted", losses=losses, temperature=2.0).item() == pytest.approx(expected)
    # Temperature limits: uniform (mean) and the best view alone.
    assert merge_outputs(outputs, "weighted", losses=losses, temperature=1e6).item() == pytest.approx(6.0, abs=1e-4)
    assert merge_outputs(outputs, "weighted", losses=losses, temperature=1e-3).item() == pytest.approx(4.0)


def test_element_weights_ignore_zero_weight_entries():
    # (B=1, k=2, 2 elements); the second view is invalid on element 1 and holds NaN there.
    outputs = torch.tensor([[[1.0, 2.0], [3.0, math.nan]]])
    weights = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    assert merge_outputs(outputs, "mean", weights=weights).tolist() == [[2.0, 2.0]]
    assert merge_outputs(outputs, "sum", weights=weights).tolist() == [[4.0, 2.0]]
    assert merge_outputs(outputs, "max", weights=weights).tolist() == [[3.0, 2.0]]
    assert merge_outputs(outputs, "min", weights=weights).tolist() == [[1.0, 2.0]]
    g = merge_outputs(torch.tensor([[[2.0, 2.0], [8.0, -1.0]]]), "gmean", weights=weights)
    assert g.tolist() == [[pytest.approx(4.0), pytest.approx(2.0)]]
    t = merge_outputs(torch.tensor([[[4.0, 9.0], [16.0, -1.0]]]), "tsharpen", weights=weights)
    assert t.tolist() == [[3.0, 3.0]]
    # Non-uniform weights: a weighted mean.
    w = torch.tensor([[[3.0, 1.0], [1.0, 0.0]]])
    assert merge_outputs(outputs, "mean", weights=w).tolist() == [[1.5, 2.0]]


def test_element_weights_dense_broadcast_and_all_zero_fallback():
    outputs = torch.arange(2 * 3 * 2 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2, 2)
    validity = torch.ones(2, 3, 1, 2, 2)
    assert torch.equal(merge_outputs(outputs, "mean", weights=validity), outputs.mean(1))
    validity[:, :, :, 0, 0] = 0  # nobody covers pixel (0, 0): the unweighted mean there
    validity[:, 0, :, 1, 1] = 0
    got = merge_outputs(outputs, "mean", weights=validity)
    assert torch.equal(got[..., 0, 0], outputs.mean(1)[..., 0, 0])
    assert torch.allclose(got[..., 1, 1], outputs[:, 1:, :, 1, 1].mean(1))
    with pytest.raises(ValueError, match="broadcast to outputs"):
        merge_outputs(outputs, "mean", weights=torch.ones(2, 3, 1, 2))


def test_weighted_with_element_weights():
    outputs = torch.tensor([[[4.0, 1.0], [8.0, 5.0]]])
    losses = torch.tensor([[0.0, math.log(3.0)]])
    weights = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    got = merge_outputs(outputs, "weighted", losses=losses, weights=weights)
    assert got.tolist() == [[pytest.approx(5.0), pytest.approx(1.0)]]


def test_k1_mean_is_exact_and_a_new_tensor():
    x = torch.randn(3, 1, 4)
    for mode in ("mean", "sum", "max", "min", "gmean"):
        out = merge_outputs(x, mode)
        assert torch.equal(out, x[:, 0]) and out.data_ptr() != x.data_ptr()


def test_errors():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="unknown merge_mode 'median'; valid modes: mean, gmean, sum, max, min, tsharpen, weighted"):
        merge_outputs(x, "median")
    with pytest.raises(ValueError, match="needs the views' predicted losses"):
        merge_outputs(x, "weighted")
    with pytest.raises(ValueError, match=r"losses must be a float tensor of shape \(B, k\) = \(2, 3\)"):
        merge_outputs(x, "weighted", losses=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="only used by merge_mode 'weighted'"):
        merge_outputs(x, "mean", losses=torch.zeros(2, 3))
    for t in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            merge_outputs(x, "weighted", losses=torch.zeros(2, 3), temperature=t)
    with pytest.raises(TypeError, match="floating point"):
        merge_outputs(torch.zeros(2, 3, dtype=torch.long), "mean")
    with pytest.raises(ValueError, match=r"\(B, k, \.\.\.\)"):
        merge_outputs(torch.zeros(3), "mean")
