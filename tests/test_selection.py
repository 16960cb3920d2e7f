import math

import pytest
import torch

from ttach_instance.selection import check_k, select_oracle, select_random, select_topk


def test_topk_lowest_first():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 0.25, 4.0, -1.0]])
    idx = select_topk(scores, 2)
    assert idx.dtype == torch.long and idx.shape == (2, 2)
    assert idx.tolist() == [[3, 1], [3, 1]]
    assert select_topk(scores, 4).tolist() == [[3, 1, 2, 0], [3, 1, 0, 2]]


def test_topk_ties_lower_index_first():
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert select_topk(scores, 3).tolist() == [[1, 2, 0], [0, 1, 2]]
    # The same on a long row (the stable sort, not an accident of a small size).
    row = torch.zeros(1, 50)
    assert select_topk(row, 50).tolist() == [list(range(50))]


def test_topk_nan_sorts_last_and_no_gradient():
    scores = torch.tensor([[math.nan, 2.0, 1.0]], requires_grad=True)
    idx = select_topk(scores, 3)
    assert idx.tolist() == [[2, 1, 0]]
    assert not idx.requires_grad


def test_oracle_is_lowest_true_loss():
    true = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.1]])
    assert select_oracle(true, 1).tolist() == [[1], [2]]
    assert select_oracle(true, 2).tolist() == [[1, 2], [2, 0]]


@pytest.mark.parametrize("fn", [select_topk, select_oracle])
def test_k_validation(fn):
    scores = torch.zeros(2, 12)
    with pytest.raises(ValueError, match=r"k=13 but there are 12 candidates"):
        fn(scores, 13)
    with pytest.raises(ValueError, match=r"k=0"):
        fn(scores, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        fn(scores, 1.0)
    with pytest.raises(TypeError, match="k must be an int"):
        fn(scores, True)


def test_check_k_names_the_space():
    with pytest.raises(ValueError, match=r"k=13 but the space 'paper12' has 12 candidates"):
        check_k(13, 12, "paper12")
    assert check_k(12, 12, "paper12") == 12


@pytest.mark.parametrize("fn", [select_topk, select_oracle])
def test_scores_shape_and_dtype(fn):
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        fn(torch.zeros(12), 1)
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.zeros(2, 12, dtype=torch.long), 1)
    with pytest.raises(TypeError, match=r"\(B, T\) tensor"):
        fn([[0.0, 1.0]], 1)


def test_random_without_replacement_and_shape():
    idx = select_random(50, 6, 6, seed=3)
    assert idx.shape == (50, 6) and idx.dtype == torch.long
    assert torch.equal(idx.sort(1).values, torch.arange(6).expand(50, 6))
    idx = select_random(50, 6, 2, seed=3)
    assert (idx[:, 0] != idx[:, 1]).all()


def test_random_reproducible_by_seed_and_generator():
    a = select_random(8, 12, 3, seed=0)
    assert torch.equal(a, select_random(8, 12, 3, seed=0))
    assert not torch.equal(a, select_random(8, 12, 3, seed=1))
    g = torch.Generator().manual_seed(0)
    first = select_random(8, 12, 3, generator=g)
    assert torch.equal(first, a)  # a seed is a fresh generator with that seed
    assert not torch.equal(first, select_random(8, 12, 3, generator=g))  # the generator advanced
    with pytest.raises(ValueError, match="not both"):
        select_random(8, 12, 3, generator=g, seed=0)


def test_random_is_uniform():
    counts = torch.bincount(select_random(6000, 4, 1, seed=0)[:, 0], minlength=4).float()
    assert ((counts - 1500).abs() < 150).all(), counts


def test_random_validation_and_device():
    with pytest.raises(ValueError, match=r"k=5 but there are 4 candidates"):
        select_random(2, 4, 5, seed=0)
    with pytest.raises(ValueError, match="num_candidates"):
        select_random(2, 0, 1)
    with pytest.raises(TypeError, match="seed"):
        select_random(2, 4, 1, seed=1.5)
    assert select_random(0, 4, 2, seed=0).shape == (0, 2)
    assert select_random(2, 4, 2, seed=0, device="cpu").device.type == "cpu"
