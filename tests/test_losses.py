import math

import pytest
import torch
import torch.nn.functional as F

import common
from common import kd_loss, soft_cross_entropy


def softmax(v, T=1.0):
    e = [math.exp(a / T) for a in v]
    return [a / sum(e) for a in e]


def soft_ce_by_hand(s, t, T):
    p, q = softmax(t, T), softmax(s, T)
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def kl_by_hand(s, t, T):
    p, q = softmax(t, T), softmax(s, T)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


S = [[1.0, 2.0, 0.5], [-0.3, 0.0, 3.0]]
TL = [[0.3, -1.0, 2.0], [1.5, 1.0, -2.0]]
Y = [1, 2]


def test_soft_cross_entropy_by_hand_summed_over_classes_and_averaged_over_the_batch():
    for T in (1.0, 2.0, 7.5):
        expected = sum(soft_ce_by_hand(s, t, T) for s, t in zip(S, TL)) / 2
        assert soft_cross_entropy(torch.tensor(S), torch.tensor(TL), T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_by_hand_its_soft_term_kl_summed_over_classes_and_averaged_over_the_batch():
    T, lam = 4.0, 0.3
    hard = sum(-math.log(softmax(s)[y]) for s, y in zip(S, Y)) / 2
    soft = sum(kl_by_hand(s, t, T) for s, t in zip(S, TL)) / 2
    got = kd_loss(torch.tensor(S), torch.tensor(TL), torch.tensor(Y), T, lam).item()
    assert got == pytest.approx(lam * T * T * soft + (1 - lam) * hard, rel=1e-6)


def test_kd_loss_edges_lam0_is_cross_entropy_and_lam1_is_scaled_kl():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    assert kd_loss(s, t, y, T=20, lam=0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    kl = F.kl_div(F.log_softmax(s / 20, -1), F.log_softmax(t / 20, -1), log_target=True, reduction="batchmean")
    assert kd_loss(s, t, y, T=20, lam=1).item() == pytest.approx(400 * kl.item(), rel=1e-4)  # float32: at T = 20 the
    # KL is small (about 0.002) and the two formulas cancel different digits of it


def test_kd_gradient_at_lam1_is_T_times_the_softmax_difference_over_the_batch():
    s, t, y = torch.randn(5, 10, requires_grad=True), torch.randn(5, 10), torch.randint(0, 10, (5,))
    T = 3.0
    kd_loss(s, t, y, T, 1.0).backward()
    expected = T * (F.softmax(s.detach() / T, -1) - F.softmax(t / T, -1)) / 5
    assert torch.allclose(s.grad, expected, atol=1e-6)


@pytest.mark.parametrize("T, lam", [(0, 0.1), (-1, 0.1), (2, 1.5), (2, -0.1)])
def test_kd_loss_rejects_bad_T_and_lam(T, lam):
    with pytest.raises(ValueError):
        kd_loss(torch.randn(2, 10), torch.randn(2, 10), torch.tensor([0, 1]), T, lam)


def test_the_kl_form_is_the_ce_form_minus_the_teachers_entropy_with_the_same_gradient():
    T, lam = 20.0, 0.7
    s, t, y = torch.tensor(S), torch.tensor(TL), torch.tensor(Y)
    entropy = sum(-sum(p * math.log(p) for p in softmax(v, T)) for v in TL) / 2
    ce_form = lam * T * T * soft_cross_entropy(s, t, T) + (1 - lam) * F.cross_entropy(s, y)
    assert kd_loss(s, t, y, T, lam).item() == pytest.approx(ce_form.item() - lam * T * T * entropy, rel=1e-5, abs=1e-5)
    t = torch.randn(6, 10)
    assert kd_loss(t.clone(), t, torch.zeros(6, dtype=torch.long), 20.0, 1.0).item() == pytest.approx(0, abs=1e-4)
    t[0, 0] = 1e4  # a teacher so sure that its other soft targets underflow to 0 at T = 1: 0 log 0 counts as 0
    assert math.isfinite(kd_loss(torch.randn(6, 10), t, torch.arange(6), 1.0, 0.5).item())
    grads = []
    for form in ("kl", "ce"):
        s = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = torch.arange(6)
        loss = kd_loss(s, t, y, 5.0, 0.4) if form == "kl" else \
            0.4 * 25 * soft_cross_entropy(s, t, 5.0) + 0.6 * F.cross_entropy(s, y)
        loss.backward()
        grads.append(s.grad)
    assert torch.allclose(*grads, atol=1e-6)


def test_the_soft_target_summary_by_hand():
    # two images over 3 classes: logits (ln 4, 0, 0) and (0, ln 2, 0), labels 0 and 2
    t = torch.tensor([[math.log(4), 0.0, 0.0], [0.0, math.log(2), 0.0]])
    s = common.soft_target_summary(t, torch.tensor([0, 2]), [1.0, 2.0])
    # T = 1: (4, 1, 1) / 6 and (1, 2, 1) / 4; top 2/3 and 1/2, true class 2/3 and 1/4
    h = lambda p: -sum(q * math.log(q) for q in p) / math.log(3)  # noqa: E731  (entropy over the uniform's)
    assert s["label"] == 0 and s["1"]["example"] == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    assert s["1"]["top"] == pytest.approx((2 / 3 + 1 / 2) / 2) and s["1"]["true"] == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert s["1"]["entropy"] == pytest.approx((h([4 / 6, 1 / 6, 1 / 6]) + h([1 / 4, 2 / 4, 1 / 4])) / 2)
    # T = 2: the logits halved, (2, 1, 1) / 4 and (1, sqrt 2, 1) / (2 + sqrt 2)
    r = 2 + math.sqrt(2)
    assert s["2"]["top"] == pytest.approx((1 / 2 + math.sqrt(2) / r) / 2) and s["2"]["true"] == pytest.approx((1 / 2 + 1 / r) / 2)
    assert s["2"]["entropy"] == pytest.approx((h([1 / 2, 1 / 4, 1 / 4]) + h([1 / r, math.sqrt(2) / r, 1 / r])) / 2)
