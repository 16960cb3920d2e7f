import math

import pytest
import torch

from ttach_instance.training.losses import (hard_rank, listwise_kl, ranking_loss, ranking_metrics, soft_rank,
                                            spearman, spearman_loss)


def sig(v):
    return 1 / (1 + math.exp(-v))


def test_soft_rank_hand_computed():
    r = soft_rank(torch.tensor([[0.0, 1.0]]), temperature=1.0)
    assert r[0, 0].item() == pytest.approx(1 + sig(-1.0), abs=1e-6)
    assert r[0, 1].item() == pytest.approx(1 + sig(1.0), abs=1e-6)
    # three values: rank of the middle one = 1 + sig(1) + sig(-1) = 2 exactly
    r3 = soft_rank(torch.tensor([[0.0, 1.0, 2.0]]), temperature=1.0)
    assert r3[0, 1].item() == pytest.approx(2.0, abs=1e-6)


def test_soft_rank_tends_to_hard_rank():
    x = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    assert torch.allclose(soft_rank(x, 1e-4), torch.tensor([[2.0, 1.0, 4.0, 3.0]]), atol=1e-4)
    assert torch.equal(hard_rank(torch.tensor([[3.0, 1, 1, 2]])), torch.tensor([[4.0, 1.5, 1.5, 3.0]]))


def test_listwise_kl_hand_computed():
    # target softmax(-[0, 1]) = [e/(e+1), 1/(e+1)], prediction uniform
    a = math.e / (math.e + 1)
    expected = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    assert listwise_kl(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(expected, abs=1e-6)
    # tau scales the target: tau=0.5 equals tau=1 on doubled losses
    t = torch.tensor([[0.2, 1.0, 0.4]])
    p = torch.tensor([[0.1, 0.0, 0.3]])
    assert listwise_kl(p, t, tau=0.5).item() == pytest.approx(listwise_kl(p, 2 * t).item(), abs=1e-6)
    # zero when the prediction equals the true losses (up to a shift)
    assert listwise_kl(t + 3.0, t).item() == pytest.approx(0.0, abs=1e-6)


def test_spearman_metric_and_loss():
    assert spearman(torch.tensor([[1.0, 2, 3]]), torch.tensor([[3.0, 2, 1]])).item() == pytest.approx(-1.0)
    # hand: ranks p = [1,3,2], t = [1,2,3]; d^2 = 0+1+1 -> 1 - 6*2/(3*8) = 0.5
    assert spearman(torch.tensor([[0.0, 5, 1]]), torch.tensor([[0.0, 1, 2]])).item() == pytest.approx(0.5)
    t = torch.randn(8, 12)
    assert spearman_loss(3 * t + 1, t, temperature=0.01).item() == pytest.approx(0.0, abs=1e-3)
    assert spearman_loss(-t, t, temperature=0.01).item() == pytest.approx(2.0, abs=1e-3)


def test_ranking_loss_trains_a_linear_scorer():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    w_true = torch.randn(6, 5)
    y = x @ w_true
    lin = torch.nn.Linear(6, 5)
    opt = torch.optim.Adam(lin.parameters(), 0.05)
    before = spearman(lin(x).detach(), y).mean().item()
    for _ in range(150):
        loss = ranking_loss(lin(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = spearman(lin(x).detach(), y).mean().item()
    assert after > 0.9 > before


def test_ranking_metrics_hand_computed():
    true = torch.tensor([[1.0, 0.5, 2.0], [0.2, 0.9, 0.1]])
    pred = torch.tensor([[0.0, 1.0, 2.0], [5.0, 6.0, 0.0]])  # picks 0 (true best 1), picks 2 (true best 2)
    correct = torch.tensor([[1, 1, 0], [0, 0, 1]])
    m = ranking_metrics(pred, true, correct)
    assert m["top1_hit"] == pytest.approx(0.5)
    assert m["regret"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["k1_accuracy"] == pytest.approx(1.0)
    assert m["identity_accuracy"] == pytest.approx(0.5)
    assert m["oracle_accuracy"] == pytest.approx(1.0)
    # sample 1: ranks pred [1,2,3] true [2,1,3] -> 1-6*2/24 = 0.5; sample 2: [2,3,1] vs [2,3,1] -> 1
    assert m["spearman"] == pytest.approx(0.75)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        listwise_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tau"):
        listwise_kl(torch.zeros(2, 3), torch.zeros(2, 3), tau=0)
    with pytest.raises(ValueError, match="temperature"):
        soft_rank(torch.zeros(1, 3), 0.0)


def test_tau_from_spread_is_half_the_median_row_std():
    from ttach_instance.training.losses import tau_from_spread

    losses = torch.tensor([[0.0, 0.02, 0.04], [1.0, 1.0, 1.3], [0.0, 2.0, 4.0]])
    # row stds (unbiased): 0.02, 0.1732, 2.0 -> median 0.1732 -> tau 0.0866
    assert tau_from_spread(losses) == pytest.approx(0.5 * 0.3 / 3 ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="spread"):
        tau_from_spread(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        tau_from_spread(torch.ones(4))
