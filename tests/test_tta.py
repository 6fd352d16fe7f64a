"""Tests of tta: scale x flip TTA, padding to stride, depth merging, batching and temperatures."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
import torch.nn.functional as F
import ttach

from tta import TTAConfig, apply_temperature, pad_to_stride, predict_tta, scaled_size

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    # A shallow U-Net keeps CPU time small; it still rejects inputs that are not multiples of 8.
    torch.manual_seed(0)
    model = smp.Unet(
        "resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=NUM_CLASSES
    )
    return model.eval()


class Softmaxed(nn.Module):
    """ttach averages whatever the model returns, so the model itself returns probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


class Counting(nn.Module):
    """Counts forward passes and the largest batch seen."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls, self.max_rows = model, 0, 0

    def forward(self, x: torch.Tensor) -> object:
        self.calls += 1
        self.max_rows = max(self.max_rows, x.shape[0])
        return self.model(x)


class SegDepth(nn.Module):
    """Pointwise logits and a depth that is NOT flip-equivariant: a left-to-right running mean."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Conv2d(3, NUM_CLASSES, 1)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> object:
        depth = x[:, :1].cumsum(dim=-1) / x.shape[-1] + 2.0
        logits = self.head(x)
        return {"seg": logits, "depth": depth} if self.as_dict else (logits, depth)


def test_hflip_matches_ttach(unet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 96)
    ref = ttach.SegmentationTTAWrapper(Softmaxed(unet), ttach.aliases.hflip_transform(), merge_mode="mean")(x)
    out = predict_tta(unet, x, TTAConfig(scales=(1.0,), hflip=True))
    assert out.probs[1.0].shape == (2, NUM_CLASSES, 64, 96)
    torch.testing.assert_close(out.probs[1.0], ref, atol=1e-5, rtol=0)


def test_multiscale_matches_ttach_views(unet: nn.Module) -> None:
    # Sizes where ttach works: 64x128 at 0.5 and 1.5 stay multiples of 32 (no padding), and ttach's
    # int(h * s) sizing agrees with our round-half-up. Conventions differ in one place: ttach's wrapper
    # averages what the model returns at each view's own size, so a softmax inside the model comes BEFORE
    # the resize back; we (like mmsegmentation) resize logits first and softmax after. We therefore take
    # ttach's views and de-augmentation (flip, bilinear scale back) and apply softmax after it ourselves.
    x = torch.randn(1, 3, 64, 128)
    transforms = ttach.Compose(
        [ttach.HorizontalFlip(), ttach.Scale([0.5, 1.5], interpolation="bilinear", align_corners=False)]
    )
    ref = torch.stack([t.deaugment_mask(unet(t.augment_image(x))).softmax(dim=1) for t in transforms]).mean(0)
    out = predict_tta(unet, x, TTAConfig(scales=(0.5, 1.0, 1.5), hflip=True))
    assert len(transforms) == TTAConfig(scales=(0.5, 1.0, 1.5)).num_views == 6
    torch.testing.assert_close(out.probs[1.0], ref, atol=1e-5, rtol=0)
    # The wrapper with softmax inside (resize of probabilities) is a different estimator.
    wrapped = ttach.SegmentationTTAWrapper(Softmaxed(unet), transforms, merge_mode="mean")(x)
    assert (wrapped - out.probs[1.0]).abs().max() > 1e-5


@pytest.mark.parametrize(("scale", "size"), [(0.75, (240, 320)), (1.25, (250, 330))])
def test_sizes_not_multiple_of_stride(unet: nn.Module, scale: float, size: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *size)
    out = predict_tta(unet, x, TTAConfig(scales=(scale,), hflip=True))
    probs = out.probs[1.0]
    assert probs.shape == (1, NUM_CLASSES, *size)
    assert out.depth is None
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, *size), atol=1e-5, rtol=0)


def test_scaled_size_and_padding_shapes() -> None:
    assert scaled_size((480, 640), 0.75) == (360, 480)
    assert scaled_size((250, 330), 1.25) == (313, 413)
    assert pad_to_stride(torch.zeros(1, 3, 360, 480), 32).shape[-2:] == (384, 480)
    with pytest.raises(ValueError, match="scale"):
        scaled_size((4, 4), 0.0)


@pytest.mark.parametrize("size", [(3, 5), (1, 7), (2, 1), (1, 1), (40, 33)])
def test_pad_to_stride_tiny(size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size)
    y = pad_to_stride(x, 32)
    assert y.shape[-2] % 32 == 0 and y.shape[-1] % 32 == 0
    assert y.shape[-2] - size[0] < 32 and y.shape[-1] - size[1] < 32
    torch.testing.assert_close(y[..., : size[0], : size[1]], x)
    # Padding only copies values of the image.
    assert torch.isin(y, x).all()


def test_pad_to_stride_is_reflect_when_possible() -> None:
    x = torch.randn(1, 2, 30, 50)
    torch.testing.assert_close(pad_to_stride(x, 32), F.pad(x, (0, 14, 0, 2), mode="reflect"))


def test_scale1_without_flip_equals_forward(unet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 96)
    out = predict_tta(unet, x, TTAConfig(scales=(1.0,), hflip=False))
    with torch.no_grad():
        ref = unet(x).softmax(dim=1)
    torch.testing.assert_close(out.probs[1.0], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(50, 70), (3, 5)])
def test_padding_is_cropped_off(size: tuple[int, int]) -> None:
    # A pointwise, flip-equivariant model sees the padding only in rows we must crop away.
    torch.manual_seed(2)
    head = nn.Conv2d(3, NUM_CLASSES, 1).eval()
    x = torch.randn(2, 3, *size)
    out = predict_tta(head, x, TTAConfig(scales=(1.0,), hflip=True, stride=32))
    with torch.no_grad():
        ref = head(x).softmax(dim=1)
    torch.testing.assert_close(out.probs[1.0], ref, atol=1e-6, rtol=0)


def test_low_resolution_logits_are_resized_back() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, NUM_CLASSES, 1)).eval()
    x = torch.randn(1, 3, 64, 96)
    out = predict_tta(model, x, TTAConfig(scales=(1.0,), hflip=False))
    with torch.no_grad():
        ref = F.interpolate(model(x), size=(64, 96), mode="bilinear", align_corners=False).softmax(dim=1)
    torch.testing.assert_close(out.probs[1.0], ref, atol=1e-6, rtol=0)
    # With padding the crop keeps the proportional part of the low-resolution output.
    assert predict_tta(model, x[..., :50, :70]).probs[1.0].shape == (1, NUM_CLASSES, 50, 70)


@pytest.mark.parametrize("as_dict", [False, True])
def test_depth_is_flipped_back_and_averaged(as_dict: bool) -> None:
    model = SegDepth(as_dict=as_dict).eval()
    x = torch.rand(2, 3, 32, 48)
    scales = (1.0, 0.5)
    out = predict_tta(model, x, TTAConfig(scales=scales, hflip=True, stride=1))

    def view(s: float, flip: bool) -> torch.Tensor:
        xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else x
        _, d = SegDepth()(xs.flip(-1) if flip else xs)
        d = d.flip(-1) if flip else d
        return F.interpolate(d, size=(32, 48), mode="bilinear", align_corners=False)

    with torch.no_grad():
        expected = torch.stack([view(s, f) for s in scales for f in (False, True)]).mean(0)
        not_flipped_back = torch.stack([SegDepth()(x)[1], SegDepth()(x.flip(-1))[1]]).mean(0)
    assert out.depth is not None and out.depth.shape == (2, 1, 32, 48)
    torch.testing.assert_close(out.depth, expected, atol=1e-6, rtol=0)
    # The depth is asymmetric, so forgetting to flip back would be caught.
    assert (expected - not_flipped_back).abs().max() > 1e-2


def test_max_batch_does_not_change_result(unet: nn.Module) -> None:
    x = torch.randn(3, 3, 64, 96)
    small, large = Counting(unet), Counting(unet)
    scales = (0.5, 1.0)
    a = predict_tta(small, x, TTAConfig(scales=scales, hflip=True, max_batch=1))
    b = predict_tta(large, x, TTAConfig(scales=scales, hflip=True, max_batch=16))
    torch.testing.assert_close(a.probs[1.0], b.probs[1.0], atol=1e-5, rtol=0)
    assert (small.calls, small.max_rows) == (12, 1)
    # Flipped and unflipped views of one scale share a single forward pass.
    assert (large.calls, large.max_rows) == (2, 6)


def test_temperatures_from_one_pass(unet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 96)
    counted = Counting(unet)
    out = predict_tta(counted, x, TTAConfig(scales=(1.0,), hflip=False, temperatures=(1.0, 0.5, 2.0)))
    assert counted.calls == 1 and set(out.probs) == {1.0, 0.5, 2.0}
    with torch.no_grad():
        logits = unet(x)
    torch.testing.assert_close(out.probs[0.5], torch.softmax(logits / 0.5, dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.probs[2.0], torch.softmax(logits / 2.0, dim=1), atol=1e-6, rtol=0)
    # With several views every temperature equals a run with that temperature alone.
    cfg = TTAConfig(scales=(0.5, 1.0), hflip=True, temperatures=(0.5, 2.0))
    both = predict_tta(unet, x, cfg)
    alone = predict_tta(unet, x, TTAConfig(scales=(0.5, 1.0), hflip=True, temperatures=(0.5,)))
    torch.testing.assert_close(both.probs[0.5], alone.probs[0.5], atol=1e-6, rtol=0)
    assert (both.probs[0.5] - both.probs[2.0]).abs().max() > 1e-3


def test_apply_temperature_matches_softmax_of_log() -> None:
    torch.manual_seed(4)
    logits = torch.randn(2, NUM_CLASSES, 6, 7) * 3
    p = logits.softmax(dim=1)
    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(apply_temperature(p, t), torch.softmax(p.log() / t, dim=1))
        expected = torch.softmax(logits / t, dim=1)
        torch.testing.assert_close(apply_temperature(p, t), expected, atol=1e-6, rtol=0)


def test_apply_temperature_float16_with_zeros() -> None:
    torch.manual_seed(5)
    p16 = (torch.randn(2, NUM_CLASSES, 6, 7) * 40).softmax(dim=1).half()
    assert (p16 == 0).any()
    for t in (0.5, 2.0, 3.0):
        q = apply_temperature(p16, t)
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(dim=1), torch.ones(2, 6, 7), atol=1e-6, rtol=0)
        assert torch.equal(q.argmax(dim=1), p16.float().argmax(dim=1))
        ref = p16.float().pow(1 / t)
        torch.testing.assert_close(q, ref / ref.sum(dim=1, keepdim=True), atol=1e-6, rtol=0)
    # A pixel whose stored probabilities all underflowed (or were never written) becomes uniform, not nan.
    empty = torch.zeros(1, NUM_CLASSES, 1, 1, dtype=torch.float16)
    torch.testing.assert_close(apply_temperature(empty, 2.0), torch.full(empty.shape, 1 / NUM_CLASSES))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(p16, 0.0)


def test_out_size_resizes_probs_and_depth() -> None:
    model = SegDepth().eval()
    x = torch.rand(1, 3, 32, 48)
    cfg = TTAConfig(scales=(1.0, 0.75), hflip=True)
    full = predict_tta(model, x, cfg)
    half = predict_tta(model, x, cfg, out_size=(16, 24))
    assert half.probs[1.0].shape == (1, NUM_CLASSES, 16, 24) and half.depth.shape == (1, 1, 16, 24)
    ref = F.interpolate(full.probs[1.0], size=(16, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(half.probs[1.0], ref)


def test_bad_inputs_raise_clear_errors() -> None:
    head = nn.Conv2d(3, NUM_CLASSES, 1)
    with pytest.raises(ValueError, match="scales"):
        TTAConfig(scales=(0.0,))
    with pytest.raises(ValueError, match="max_batch"):
        TTAConfig(max_batch=0)
    with pytest.raises(ValueError, match="temperatures"):
        TTAConfig(temperatures=())
    with pytest.raises(ValueError, match="images"):
        predict_tta(head, torch.zeros(3, 8, 8))
    with pytest.raises(KeyError, match="seg"):
        predict_tta(lambda x: {"logits": head(x)}, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="depth"):
        predict_tta(lambda x: (head(x), x), torch.zeros(1, 3, 8, 8))
    assert TTAConfig(scales=[0.5, 1], temperatures=[1]).scales == (0.5, 1.0)
