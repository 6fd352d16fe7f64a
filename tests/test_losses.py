import math

import pytest
import torch
import torch.nn.functional as F

from kfold.losses import (
    SegDepthLoss,
    berhu_loss,
    edge_aware_smoothness,
    l1_depth_loss,
    label_boundaries,
    parts_as_floats,
)

C = 5
B, H, W = 2, 12, 16


def _batch(seed: int = 0, ignore_frac: float = 0.2, missing_frac: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g, requires_grad=True)
    label = torch.randint(0, C, (B, H, W), generator=g)
    label[torch.rand(B, H, W, generator=g) < ignore_frac] = 255
    depth = torch.rand(B, 1, H, W, generator=g) * 5 + 0.5
    depth[torch.rand(B, 1, H, W, generator=g) < missing_frac] = 0.0
    depth_pred = (torch.rand(B, 1, H, W, generator=g) * 5 + 0.5).requires_grad_()
    image = torch.rand(B, 4, H, W, generator=g)
    return logits, depth_pred, label, depth, image


def test_ce_matches_torch_and_parts():
    logits, depth_pred, label, depth, _ = _batch()
    loss = SegDepthLoss(C, depth_loss="none")
    total, parts = loss(logits, None, label, depth)
    parts = parts_as_floats(parts)
    want = F.cross_entropy(logits, label, ignore_index=255)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert set(parts) == {"ce", "depth", "smooth", "total"}
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["depth"] == 0.0 and parts["smooth"] == 0.0 and parts["ce"] == pytest.approx(want.item())


def test_class_weights_match_torch_weighted_ce():
    logits, _, label, _, _ = _batch(1)
    weights = [1.0, 1.5, 0.5, 1.0, 2.0]
    total, _ = SegDepthLoss(C, class_weights=weights, depth_loss="none")(logits, None, label)
    want = F.cross_entropy(logits, label, weight=torch.tensor(weights), ignore_index=255)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)


def test_low_resolution_logits_are_upsampled_bilinearly():
    logits, _, label, _, _ = _batch(2)
    small = logits.detach()[:, :, ::2, ::2]
    total, _ = SegDepthLoss(C, depth_loss="none")(small, None, label)
    up = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    assert total.item() == pytest.approx(F.cross_entropy(up, label, ignore_index=255).item(), rel=1e-6)


def test_boundary_mask_on_vertical_edge():
    label = torch.zeros(1, 6, 10, dtype=torch.long)
    label[:, :, 5:] = 3
    for width in (1, 2):
        mask = label_boundaries(label, width)
        cols = mask[0].all(dim=0)
        assert mask[0].any(dim=0).eq(cols).all()  # whole columns
        expected = torch.zeros(10, dtype=torch.bool)
        expected[5 - width : 5 + width] = True
        assert torch.equal(cols, expected)


def test_boundary_ignores_255_neighbours_and_ignored_pixels():
    label = torch.zeros(1, 5, 8, dtype=torch.long)
    label[:, :, 4:] = 255
    assert not label_boundaries(label, 1).any()
    label[:, :, 6:] = 2  # columns 4,5 ignored: classes 0 (col 3) and 2 (col 6) are 3 pixels apart
    assert not label_boundaries(label, 2).any()
    mask = label_boundaries(label, 3)
    assert mask[0].all(dim=0).tolist() == [False, False, False, True, False, False, True, False]


def test_boundary_pixel_weights_and_weighted_mean():
    label = torch.zeros(1, 6, 10, dtype=torch.long)
    label[:, :, 5:] = 3
    label[0, 0, 0] = 255
    loss = SegDepthLoss(C, class_weights=[1.0, 1.0, 1.0, 1.5, 1.0], boundary_weight=2.0, depth_loss="none")
    w = loss.pixel_weights(label)[0]
    assert w[1, 4].item() == 2.0 and w[1, 5].item() == 3.0  # boundary x class weight
    assert w[1, 3].item() == 1.0 and w[1, 6].item() == 1.5
    assert w[0, 0].item() == 0.0
    logits = torch.randn(1, C, 6, 10)
    total, _ = loss(logits, None, label)
    per_pixel = F.cross_entropy(logits, label, ignore_index=255, reduction="none")[0]
    assert total.item() == pytest.approx(((per_pixel * w).sum() / w.sum()).item(), rel=1e-6)


def test_ohem_keeps_top_fraction():
    logits, _, label, _, _ = _batch(3)
    total, _ = SegDepthLoss(C, ohem_fraction=0.25, depth_loss="none")(logits, None, label)
    per_pixel = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    valid_losses = per_pixel[label != 255]
    k = math.ceil(0.25 * valid_losses.numel())
    want = valid_losses.sort(descending=True).values[:k].mean()
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    full, _ = SegDepthLoss(C, depth_loss="none")(logits, None, label)
    assert total.item() > full.item()


def _manual_l1(pred, target):
    valid = target > 0
    return (pred - target).abs()[valid].mean()


def _manual_berhu(pred, target):
    valid = target > 0
    e = (pred - target).abs()[valid]
    c = 0.2 * e.max()
    return torch.where(e <= c, e, (e**2 + c**2) / (2 * c)).mean()


@pytest.mark.parametrize("kind", ["l1", "berhu"])
def test_depth_losses_match_manual_and_skip_missing(kind):
    logits, depth_pred, label, depth, _ = _batch(4)
    manual = _manual_l1 if kind == "l1" else _manual_berhu
    fn = l1_depth_loss if kind == "l1" else berhu_loss
    assert fn(depth_pred, depth).item() == pytest.approx(manual(depth_pred, depth).item(), rel=1e-6)
    loss = SegDepthLoss(C, depth_loss=kind, depth_weight=0.1)
    total, parts = loss(logits, depth_pred, label, depth)
    parts = parts_as_floats(parts)
    assert parts["depth"] == pytest.approx(manual(depth_pred, depth).item(), rel=1e-6)
    assert total.item() == pytest.approx(parts["ce"] + 0.1 * parts["depth"], rel=1e-6)
    # A huge error at a missing pixel changes nothing.
    poisoned = depth_pred.detach().clone()
    poisoned[depth == 0] = 1e6
    assert fn(poisoned, depth).item() == pytest.approx(manual(depth_pred, depth).item(), rel=1e-6)


def test_berhu_is_quadratic_above_threshold():
    target = torch.ones(1, 1, 1, 3)
    pred = torch.tensor([[[[1.1, 1.5, 2.0]]]])  # errors 0.1, 0.5, 1.0 -> c = 0.2
    want = (0.1 + (0.25 + 0.04) / 0.4 + (1.0 + 0.04) / 0.4) / 3
    assert berhu_loss(pred, target).item() == pytest.approx(want, rel=1e-6)


def test_depth_prediction_upsampled_to_target():
    logits, _, label, depth, _ = _batch(5)
    small = torch.rand(B, 1, H // 2, W // 2) + 1
    _, parts = SegDepthLoss(C)(logits, small, label, depth)
    parts = parts_as_floats(parts)
    up = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    assert parts["depth"] == pytest.approx(_manual_l1(up, depth).item(), rel=1e-6)


def test_no_valid_depth_and_no_labels_give_zero_not_nan():
    logits, depth_pred, label, depth, _ = _batch(6)
    loss = SegDepthLoss(C, depth_loss="berhu", boundary_weight=2.0, ohem_fraction=0.5)
    total, parts = loss(logits, depth_pred, torch.full_like(label, 255), torch.zeros_like(depth))
    parts = parts_as_floats(parts)
    assert parts["ce"] == 0.0 and parts["depth"] == 0.0 and parts["total"] == 0.0
    assert total.grad_fn is not None
    total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(depth_pred.grad).all()


def test_kendall_weighting_and_clamp():
    logits, depth_pred, label, depth, _ = _batch(7)
    loss = SegDepthLoss(C, weighting="kendall", depth_loss="l1")
    with torch.no_grad():
        loss.log_sigma_seg.fill_(5.0)  # outside the range: acts as 2
        loss.log_sigma_depth.fill_(-0.5)
    total, parts = loss(logits, depth_pred, label, depth)
    parts = parts_as_floats(parts)
    want = math.exp(-4) * parts["ce"] + 2 + 0.5 * math.exp(1.0) * parts["depth"] - 0.5
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert parts["sigma_seg"] == pytest.approx(math.exp(2)) and parts["sigma_depth"] == pytest.approx(math.exp(-0.5))
    total.backward()
    assert loss.log_sigma_seg.grad.item() == 0.0  # clamped: no gradient outside the range
    # Inside the range: d/ds (0.5 exp(-2s) L + s) = 1 - exp(-2s) L.
    assert loss.log_sigma_depth.grad.item() == pytest.approx(1 - math.exp(1.0) * parts["depth"], rel=1e-5)
    assert {n for n, _ in loss.named_parameters()} == {"log_sigma_seg", "log_sigma_depth"}


def test_smoothness_zero_for_constant_depth_and_positive_otherwise():
    _, _, _, _, image = _batch(8)
    assert edge_aware_smoothness(torch.full((B, 1, H, W), 3.0), image[:, :3]).item() == 0.0
    ramp = torch.arange(W, dtype=torch.float32).expand(B, 1, H, W) + 1
    flat = torch.zeros(B, 3, H, W)
    got = edge_aware_smoothness(ramp, flat).item()
    d = ramp / ramp.mean(dim=(2, 3), keepdim=True)
    assert got == pytest.approx((d[..., 1:] - d[..., :-1]).abs().mean().item(), rel=1e-6)
    # Image edges damp the penalty.
    assert edge_aware_smoothness(ramp, torch.rand(B, 3, H, W) * 10).item() < got


def test_smoothness_in_total_at_prediction_resolution():
    logits, _, label, depth, image = _batch(9)
    small = (torch.rand(B, 1, H // 2, W // 2) + 1).requires_grad_()
    loss = SegDepthLoss(C, depth_loss="l1", depth_weight=0.1, smoothness_weight=0.01)
    total, parts = loss(logits, small, label, depth, image)
    parts = parts_as_floats(parts)
    rgb = F.interpolate(image[:, :3], size=(H // 2, W // 2), mode="bilinear", align_corners=False)
    assert parts["smooth"] == pytest.approx(edge_aware_smoothness(small, rgb).item(), rel=1e-6)
    assert total.item() == pytest.approx(parts["ce"] + 0.1 * parts["depth"] + 0.01 * parts["smooth"], rel=1e-6)


@pytest.mark.parametrize("weighting", ["fixed", "kendall"])
def test_gradients_reach_logits_and_depth(weighting):
    logits, depth_pred, label, depth, image = _batch(10)
    loss = SegDepthLoss(
        C, boundary_weight=2.0, ohem_fraction=0.25, depth_loss="berhu", weighting=weighting, smoothness_weight=0.1
    )
    total, _ = loss(logits, depth_pred, label, depth, image)
    total.backward()
    assert logits.grad.abs().sum() > 0 and depth_pred.grad.abs().sum() > 0
    assert torch.isfinite(logits.grad).all() and torch.isfinite(depth_pred.grad).all()


def test_bad_configuration_and_inputs_raise():
    with pytest.raises(ValueError, match="class_weights has 2 values"):
        SegDepthLoss(C, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="depth_loss"):
        SegDepthLoss(C, depth_loss="l2")
    with pytest.raises(ValueError, match="ohem_fraction"):
        SegDepthLoss(C, ohem_fraction=0.0)
    with pytest.raises(ValueError, match="kendall"):
        SegDepthLoss(C, weighting="kendall", depth_loss="none")
    logits, depth_pred, label, depth, _ = _batch(11)
    with pytest.raises(ValueError, match="depth_pred"):
        SegDepthLoss(C)(logits, None, label, depth)
    with pytest.raises(ValueError, match="seg_logits"):
        SegDepthLoss(C + 1)(logits, depth_pred, label, depth)
    with pytest.raises(ValueError, match="image"):
        SegDepthLoss(C, smoothness_weight=0.1)(logits, depth_pred, label, depth, None)


def test_soft_targets_kl_is_zero_at_the_teacher_and_skips_uncovered_pixels():
    from kfold.losses import soft_target_loss

    logits = torch.randn(2, 4, 6, 6)
    teacher = torch.softmax(logits, 1)
    assert soft_target_loss(logits, teacher, 2.0).abs() < 1e-6
    other = torch.randn(2, 4, 6, 6)
    by_hand = (teacher * (teacher.log() - F.log_softmax(other, 1))).sum(1).mean()
    assert torch.allclose(soft_target_loss(other, teacher, 1.0), by_hand, atol=1e-5)
    half = teacher.clone()
    half[..., 3:] = 0  # invented pixels: no target
    covered = (teacher * (teacher.log() - F.log_softmax(other, 1))).sum(1)[..., :3].mean()
    assert torch.allclose(soft_target_loss(other, half, 1.0), covered, atol=1e-5)
    assert soft_target_loss(other, torch.zeros_like(teacher)) == 0  # nothing covered: 0, not nan
    certain = torch.zeros_like(teacher)
    certain[:, 1] = 1.0  # stored float16 zeros: at T < 1 they stay exact zeros, which must add 0, not nan
    for temperature in (0.5, 1.0, 4.0):
        assert torch.isfinite(soft_target_loss(other, certain.half(), temperature))


def test_soft_term_enters_the_total_with_its_weight():
    logits, label = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randint(0, 4, (2, 6, 6))
    teacher = torch.softmax(torch.randn(2, 4, 6, 6), 1)
    loss = SegDepthLoss(4, depth_loss="none", distill_alpha=0.5, distill_temperature=2.0)
    total, parts = loss(logits, None, label, soft=teacher)
    assert torch.allclose(total, parts["ce"] + 0.5 * parts["distill"])
    total.backward()
    assert logits.grad is not None and "distill" not in loss(logits, None, label)[1]
    with pytest.raises(ValueError, match="soft must be"):
        loss(logits, None, label, soft=teacher[:, :3])
