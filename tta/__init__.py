"""Test-time augmentation (scales x horizontal flip) for segmentation and depth models."""

from tta.functional import apply_temperature, pad_to_stride, scaled_size, split_output
from tta.predict import TTAConfig, TTAOutput, predict_tta

__all__ = [
    "TTAConfig",
    "TTAOutput",
    "apply_temperature",
    "pad_to_stride",
    "predict_tta",
    "scaled_size",
    "split_output",
]
