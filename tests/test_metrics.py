import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from kfold.argmax import upsampled_argmax
from kfold.metrics import (
    DepthMeter,
    confusion_matrix,
    confusion_matrix_torch,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)

C = 13


def _random_pair(seed: int, shape=(3, 48, 64), dtype=np.uint8, ignore_frac=0.2):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, C, shape).astype(dtype)
    target[rng.random(shape) < ignore_frac] = 255
    pred = rng.integers(0, C, shape).astype(dtype)
    return target, pred


def _sklearn(target, pred):
    valid = target != 255
    return sk_confusion_matrix(target[valid], pred[valid], labels=np.arange(C))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.int32])
def test_confusion_matrix_matches_sklearn(dtype):
    target, pred = _random_pair(0, dtype=dtype)
    cm = confusion_matrix(target, pred, C)
    assert cm.dtype == np.int64 and cm.shape == (C, C)
    np.testing.assert_array_equal(cm, _sklearn(target, pred))
    assert cm.sum() == (target != 255).sum()


@pytest.mark.parametrize("n_classes", [13, 200])
def test_confusion_matrix_other_ignore_index_and_many_classes(n_classes):
    rng = np.random.default_rng(1)
    target = rng.integers(0, n_classes, (40, 50))
    target[rng.random(target.shape) < 0.1] = -1
    pred = rng.integers(0, n_classes, (40, 50))
    cm = confusion_matrix(target, pred, n_classes, ignore_index=-1)
    valid = target != -1
    labels = np.arange(n_classes)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(target[valid], pred[valid], labels=labels))
    cm_t = confusion_matrix_torch(torch.from_numpy(target), torch.from_numpy(pred), n_classes, ignore_index=-1)
    np.testing.assert_array_equal(cm_t.numpy(), cm)


def test_confusion_matrix_rows_are_target():
    target = np.array([0, 0, 1, 255], dtype=np.uint8)
    pred = np.array([1, 1, 1, 0], dtype=np.uint8)
    cm = confusion_matrix(target, pred, 2)
    np.testing.assert_array_equal(cm, [[0, 2], [0, 1]])


def test_confusion_matrix_torch_matches_numpy():
    target, pred = _random_pair(2)
    expected = confusion_matrix(target, pred, C)
    for t_dtype in (torch.uint8, torch.int64):
        for check in (True, False):  # unchecked (the validation loop's): the same counts, nothing read back
            cm = confusion_matrix_torch(torch.from_numpy(target).to(t_dtype), torch.from_numpy(pred).long(), C,
                                        check=check)
            assert cm.dtype == torch.int64 and cm.shape == (C, C)
            np.testing.assert_array_equal(cm.numpy(), expected)


@pytest.mark.parametrize("fn", [confusion_matrix, confusion_matrix_torch])
def test_confusion_matrix_rejects_bad_values(fn):
    conv = torch.from_numpy if fn is confusion_matrix_torch else (lambda a: a)
    target = np.zeros((4, 4), dtype=np.uint8)
    pred = np.zeros((4, 4), dtype=np.uint8)
    bad_target = target.copy()
    bad_target[1, 2] = 17
    with pytest.raises(ValueError, match="target has value 17"):
        fn(conv(bad_target), conv(pred), C)
    bad_pred = pred.copy()
    bad_pred[0, 0] = 13
    with pytest.raises(ValueError, match="pred has value 13"):
        fn(conv(target), conv(bad_pred), C)
    with pytest.raises(ValueError, match=r"target shape \(4, 4\) != pred shape \(4, 3\)"):
        fn(conv(target), conv(pred[:, :3]), C)


def test_confusion_matrix_rejects_negative_and_float():
    with pytest.raises(ValueError, match="target has value -3"):
        confusion_matrix(np.array([0, -3]), np.array([0, 0]), C)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.zeros(3, dtype=np.float32), np.zeros(3, dtype=np.uint8), C)


def test_confusion_matrix_all_ignored_and_empty():
    target = np.full((5, 5), 255, dtype=np.uint8)
    pred = np.zeros((5, 5), dtype=np.uint8)
    assert confusion_matrix(target, pred, C).sum() == 0
    assert confusion_matrix(target[:0], pred[:0], C).sum() == 0
    assert confusion_matrix_torch(torch.from_numpy(target), torch.from_numpy(pred), C).sum() == 0


def test_iou_edge_cases():
    # Class 0: tp 2, fn 1, fp 1 -> 2/4. Class 1: predicted once but never in the target -> 0.
    # Class 2: neither in the target nor predicted -> nan, excluded from the mean.
    target = np.array([0, 0, 0, 3, 3], dtype=np.uint8)
    pred = np.array([0, 0, 1, 0, 3], dtype=np.uint8)
    cm = confusion_matrix(target, pred, 4)
    iou = iou_per_class(cm)
    assert iou.dtype == np.float64
    np.testing.assert_allclose(iou[[0, 1, 3]], [0.5, 0.0, 0.5])
    assert math.isnan(iou[2])
    assert mean_iou(cm) == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)


def test_metrics_of_empty_matrix_are_nan():
    cm = np.zeros((3, 3), dtype=np.int64)
    assert np.isnan(iou_per_class(cm)).all()
    assert math.isnan(mean_iou(cm))
    assert math.isnan(pixel_accuracy(cm))
    with pytest.raises(ValueError, match=r"\(C, C\) or \(C, C \+ 1\)"):
        iou_per_class(np.zeros((2, 4)))
    # a (C, C + 1) matrix: the last column counts labelled pixels no class claimed (wrong for every class)
    none_column = np.array([[1, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(iou_per_class(none_column), [0.5, 1.0])
    assert pixel_accuracy(none_column) == pytest.approx(2 / 3)


def test_miou_vs_direct_definition_and_torch_input():
    target, pred = _random_pair(3)
    cm = confusion_matrix(target, pred, C)
    valid = target != 255
    ious = []
    for c in range(C):
        inter = ((target == c) & (pred == c) & valid).sum()
        union = (((target == c) | (pred == c)) & valid).sum()
        ious.append(inter / union)
    assert mean_iou(cm) == pytest.approx(np.mean(ious))
    assert mean_iou(torch.from_numpy(cm)) == pytest.approx(np.mean(ious))
    assert pixel_accuracy(cm) == pytest.approx(((target == pred) & valid).sum() / valid.sum())


def _manual_depth(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    valid = target > 0
    p, t = pred[valid].astype(np.float64), target[valid].astype(np.float64)
    ratio = np.maximum(p / t, t / p)
    return {
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "absrel": float(np.mean(np.abs(p - t) / t)),
        "delta1": float(np.mean(ratio < 1.25)),
    }


def test_depth_meter_matches_manual_over_batches():
    rng = np.random.default_rng(4)
    target = rng.uniform(0.5, 8.0, (4, 1, 12, 16)).astype(np.float32)
    target[rng.random(target.shape) < 0.3] = 0.0
    pred = (target + rng.normal(0, 0.6, target.shape)).clip(0.1).astype(np.float32)
    meter = DepthMeter()
    meter.update(torch.from_numpy(pred[:3]), torch.from_numpy(target[:3]))
    meter.update(torch.from_numpy(pred[3:, 0]), torch.from_numpy(target[3:, 0]))  # (B, H, W) also works
    got = meter.compute()
    want = _manual_depth(pred, target)
    for key in ("rmse", "absrel", "delta1"):
        assert got[key] == pytest.approx(want[key], rel=1e-9)
    assert meter.state.dtype == torch.float64 and meter.state.shape == (4,)
    assert meter.state[0].item() == (target > 0).sum()


def test_depth_meter_resizes_prediction_bilinearly():
    rng = np.random.default_rng(5)
    target = torch.from_numpy(rng.uniform(1.0, 5.0, (2, 1, 24, 32)).astype(np.float32))
    small = torch.from_numpy(rng.uniform(1.0, 5.0, (2, 1, 12, 16)).astype(np.float32))
    up = torch.nn.functional.interpolate(small, size=(24, 32), mode="bilinear", align_corners=False)
    meter = DepthMeter()
    meter.update(small, target)
    want = _manual_depth(up.numpy(), target.numpy())
    assert meter.compute()["rmse"] == pytest.approx(want["rmse"], rel=1e-6)


def test_depth_meter_states_add_up_like_all_reduce_and_reset():
    rng = np.random.default_rng(6)
    target = torch.from_numpy(rng.uniform(0.5, 4.0, (4, 1, 8, 8)).astype(np.float32))
    pred = target * 1.1
    whole, a, b = DepthMeter(), DepthMeter(), DepthMeter()
    whole.update(pred, target)
    a.update(pred[:1], target[:1])
    b.update(pred[1:], target[1:])
    a.state += b.state
    assert a.compute() == pytest.approx(whole.compute())
    assert whole.compute()["delta1"] == 1.0
    whole.reset()
    assert all(math.isnan(v) for v in whole.compute().values())


def test_depth_meter_nonpositive_prediction_is_not_accurate():
    target = torch.full((1, 1, 2, 2), 2.0)
    pred = torch.tensor([[[[2.0, -2.0], [0.0, 2.2]]]])
    meter = DepthMeter()
    meter.update(pred, target)
    assert meter.compute()["delta1"] == pytest.approx(0.5)


def test_depth_meter_rejects_bad_shapes():
    with pytest.raises(ValueError, match="depth pred shape"):
        DepthMeter().update(torch.zeros(2, 3, 4, 4), torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize(("small", "size"), [((24, 32), (48, 64)), ((13, 17), (40, 33)), ((30, 40), (12, 16)),
                                             ((1, 5), (3, 9)), ((6, 8), (6, 8))])
def test_upsampled_argmax_is_torchs_up_to_near_ties(small: tuple[int, int], size: tuple[int, int]) -> None:
    """The fused kernel's class map is torch's (interpolate, then argmax) except where two classes of the
    float64 upsampling are within float32 rounding; exact ties keep the first class, as torch."""
    g = torch.Generator().manual_seed(sum(small) + sum(size))
    probs = torch.rand(3, 13, *small, generator=g).softmax(1).half()
    probs[0, 5] = probs[0, 2]  # classes 2 and 5 tied everywhere in image 0: 2 must win where they lead
    got = upsampled_argmax(probs, size)
    assert got.dtype == torch.uint8 and got.shape == (3, *size)
    exact = F.interpolate(probs.double(), size=size, mode="bilinear", align_corners=False)
    top2 = exact.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < 1e-6
    assert (got.long() == exact.argmax(1))[~near_tie].all()
    assert near_tie[1:].float().mean() < 0.01  # the comparison above covers nearly every untied pixel
    leads = exact.argmax(1)[0]
    assert not (got[0] == 5).any() and (got[0][leads == 2] == 2).all()
    torch_map = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False).argmax(1)
    assert (got.long() != torch_map).float().mean() < 1e-3
