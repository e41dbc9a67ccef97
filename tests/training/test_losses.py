import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrvit.training.config import LossConfig
from cxrvit.training.losses import AsymmetricLoss, BCELoss, FocalLoss, build_loss, positive_weights


def _data(seed=0, b=6, k=5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, k, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = (torch.rand(b, k, generator=g) < 0.3).double()
    return x, y


def asl_reference(x, y, gp, gn, clip):
    """Ridnik et al.'s published formulation, written naively."""
    p = torch.sigmoid(x)
    pm = torch.clamp(p - clip, min=0)
    lp = y * torch.log(p) * (1 - p) ** gp
    ln = (1 - y) * torch.log(1 - pm) * pm ** gn
    return -(lp + ln).mean()


def test_bce_matches_torch_and_weighted_bce_weights_positives():
    x, y = _data()
    assert torch.allclose(BCELoss()(x, y), F.binary_cross_entropy_with_logits(x, y))
    pw = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    manual = -(pw * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()
    assert torch.allclose(BCELoss(pw)(x, y), manual)


def test_positive_weights_from_prevalence_and_cap():
    t = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 1]], dtype=np.float32)
    w = positive_weights(t, max_weight=10.0)
    assert w.tolist() == [3.0, 10.0, 1.0]  # 3 neg/1 pos; no positives -> cap; 2/2 -> 1


def test_focal_with_gamma_zero_is_bce_and_downweights_easy_examples():
    x, y = _data()
    assert torch.allclose(FocalLoss(gamma=0.0)(x, y), F.binary_cross_entropy_with_logits(x, y))
    easy = torch.tensor([[6.0]], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    assert FocalLoss(2.0)(easy, one) < 1e-3 * F.binary_cross_entropy_with_logits(easy, one)


def test_asl_matches_reference_values_and_gradients():
    x, y = _data(1)
    ours = AsymmetricLoss(gamma_pos=1.0, gamma_neg=4.0, clip=0.05)(x, y)
    ref = asl_reference(x, y, 1.0, 4.0, 0.05)
    assert torch.allclose(ours, ref)
    g_ours, = torch.autograd.grad(ours, x)
    g_ref, = torch.autograd.grad(asl_reference(x, y, 1.0, 4.0, 0.05), x)
    assert torch.allclose(g_ours, g_ref)
    # with no focusing and no clip, ASL is plain BCE
    assert torch.allclose(AsymmetricLoss(0.0, 0.0, 0.0)(x, y), F.binary_cross_entropy_with_logits(x, y))


@pytest.mark.parametrize("loss", [BCELoss(torch.tensor([2.0] * 5)), FocalLoss(2.0, 0.25),
                                  AsymmetricLoss(1.0, 4.0, 0.05)])
def test_gradients_match_finite_differences(loss):
    x, y = _data(2)
    # keep away from the clip kink of ASL, where the derivative is not defined
    assert torch.autograd.gradcheck(lambda z: loss(z, y), (x.detach().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_asl_ignores_very_easy_negatives():
    x = torch.tensor([[-6.0]])  # p ~ 0.0025 < clip
    assert AsymmetricLoss(0, 4, 0.05)(x, torch.zeros(1, 1)).item() == 0.0


def test_bf16_logits_are_computed_in_float32():
    x, y = _data()
    out = build_loss(LossConfig(kind="asl"))(x.detach().bfloat16(), y)
    assert out.dtype == torch.float32


def test_build_loss_errors():
    with pytest.raises(ValueError, match="training targets"):
        build_loss(LossConfig(kind="weighted_bce"))
    with pytest.raises(ValueError, match="unknown loss.kind"):
        build_loss(LossConfig(kind="hinge"))
