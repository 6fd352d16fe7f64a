"""Albumentations pipelines that keep RGB, depth and labels aligned.

Labels and depth are only ever moved, never blended (nearest interpolation), so a label stays a class id
and a depth stays a real reading. Pixels that a rotation or padding invents are label 255 (ignore) and
depth 0 (missing). Albumentations fills every mask with one ``fill_mask``, so the label travels shifted
by +1 in a uint16 mask: a fill of 0 then reads back as 255 for the label and as "missing" for the depth.
"""

from __future__ import annotations

import os

# albumentations asks PyPI for a newer release at import time unless this is set; no run of ours should touch
# the network, and this module is the one that imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2
import numpy as np
import torch

from kfold.data.layout import IGNORE_INDEX

__all__ = ["EvalTransform", "TrainTransform"]


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys, the same in every process (unlike ``hash`` of strings)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _check_size(name: str, size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ValueError(f"{name} must be two positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def _resize(size: tuple[int, int]) -> A.Resize:
    # Train and eval share the image interpolation, so the network sees the same statistics.
    return A.Resize(*size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)


def _shift_label(label: np.ndarray) -> np.ndarray:
    return label.astype(np.uint16) + 1


def _unshift_label(shifted: np.ndarray) -> np.ndarray:
    label = shifted.astype(np.int32) - 1
    label[shifted == 0] = IGNORE_INDEX
    return label.astype(np.uint8)


class TrainTransform:
    """Resize, scale/rotate, crop (padded when needed), flip and colour-jitter image, depth and label.

    Call with ``image`` uint8 (H, W, 3), ``depth`` float32 (H, W) metres, ``label`` uint8 (H, W) and optionally
    ``depth_target`` (a teacher's depth for the loss) and ``soft`` float32 (H, W, C) (a teacher's class
    probabilities); returns ``image``, ``depth`` (the target, else the sensor), ``label``, ``depth_input`` (the
    sensor's depth) and ``soft`` when given, at the crop size. Invented pixels of ``soft`` are all 0 (not covered).

    Args:
        input_size: (H, W) every sample is resized to first.
        crop_size: (H, W) of the random crop; padded (image 0, label 255, depth 0) when larger.
        hflip: probability of a horizontal flip.
        scale_limit: scale factor drawn from [1 - scale_limit, 1 + scale_limit] (aspect kept).
        rotate_limit: rotation in degrees drawn from [-rotate_limit, rotate_limit].
        color_jitter: brightness, contrast and saturation jitter (hue: a quarter of it); RGB only.
        seed: seed of the augmentation RNG (None: fresh entropy). DataLoader workers reseed from their
            torch worker seed, so workers and epochs never repeat each other's augmentations.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        crop_size: tuple[int, int],
        hflip: float = 0.5,
        scale_limit: float = 0.1,
        rotate_limit: float = 5.0,
        color_jitter: float = 0.2,
        seed: int | None = None,
    ) -> None:
        self.input_size = _check_size("input_size", input_size)
        self.crop_size = _check_size("crop_size", crop_size)
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        if not 0.0 <= scale_limit < 1.0:
            raise ValueError(f"scale_limit must be in [0, 1), got {scale_limit}")
        if rotate_limit < 0 or color_jitter < 0:
            raise ValueError(f"rotate_limit and color_jitter must be >= 0: {rotate_limit}, {color_jitter}")
        steps: list[A.BasicTransform] = [_resize(self.input_size)]
        if scale_limit > 0 or rotate_limit > 0:
            steps.append(
                A.Affine(
                    scale=(1.0 - scale_limit, 1.0 + scale_limit),
                    rotate=(-rotate_limit, rotate_limit),
                    keep_ratio=True,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=0,
                    p=1.0,
                )
            )
        steps.append(
            A.RandomCrop(*self.crop_size, pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)
        )
        if hflip > 0:
            steps.append(A.HorizontalFlip(p=hflip))
        if color_jitter > 0:
            steps.append(
                A.ColorJitter(
                    brightness=color_jitter,
                    contrast=color_jitter,
                    saturation=color_jitter,
                    hue=min(0.5, color_jitter / 4),
                    p=1.0,
                )
            )
        self.pipeline = A.Compose(steps, additional_targets={"depth": "mask", "depth_target": "mask", "soft": "mask"},
                                  seed=seed)
        self._rng_owner: tuple[int, int] | None = None

    @staticmethod
    def _worker_key() -> tuple[int, int] | None:
        info = torch.utils.data.get_worker_info()
        return None if info is None else (os.getpid(), info.seed)

    def reseed(self, seed: int) -> None:
        """Seed the augmentation RNG, e.g. per sample from (seed, epoch, index) for exact resumes.

        An explicit seed wins over the automatic per-worker seeding for the rest of this worker's life.
        """
        self.pipeline.set_random_seed(seed)
        self._rng_owner = self._worker_key()

    def _reseed_in_worker(self) -> None:
        # A forked DataLoader worker inherits the parent's RNG state: without this every worker would
        # draw the same augmentations. torch gives each worker (and each epoch) its own seed.
        key = self._worker_key()
        if key is not None and key != self._rng_owner:
            self.pipeline.set_random_seed(key[1] % 2**32)
            self._rng_owner = key

    def __call__(self, image: np.ndarray, depth: np.ndarray, label: np.ndarray,
                 depth_target: np.ndarray | None = None, soft: np.ndarray | None = None) -> dict[str, np.ndarray]:
        self._reseed_in_worker()
        arrays = {"image": image, "mask": _shift_label(label), "depth": depth.astype(np.float32, copy=False)}
        if depth_target is not None:  # a teacher's depth for the loss moves with the sensor's
            arrays["depth_target"] = depth_target.astype(np.float32, copy=False)
        if soft is not None:  # a teacher's probabilities: moved like a mask, so never blended across pixels
            arrays["soft"] = soft
        out = self.pipeline(**arrays)
        depth_out = np.ascontiguousarray(out["depth"], dtype=np.float32)
        target = depth_out if depth_target is None else np.ascontiguousarray(out["depth_target"], dtype=np.float32)
        result = {
            "image": np.ascontiguousarray(out["image"]),
            "depth": target,
            "label": np.ascontiguousarray(_unshift_label(out["mask"])),
            "depth_input": depth_out,
        }
        if soft is not None:
            result["soft"] = np.ascontiguousarray(out["soft"], dtype=np.float32)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r})"


class EvalTransform:
    """Resize the image and the input depth to the network size; keep label and target depth native.

    Call with ``image``, ``depth``, ``label`` as for :class:`TrainTransform`; returns ``image`` and
    ``depth_input`` at ``input_size`` and ``depth`` / ``label`` unchanged, so scoring is at full resolution.

    Args:
        input_size: (H, W) of the network input.
    """

    def __init__(self, input_size: tuple[int, int]) -> None:
        self.input_size = _check_size("input_size", input_size)
        self.pipeline = A.Compose(
            [_resize(self.input_size)],
            additional_targets={"depth_input": "mask"},
        )

    def __call__(self, image: np.ndarray, depth: np.ndarray, label: np.ndarray,
                 depth_target: np.ndarray | None = None) -> dict[str, np.ndarray]:
        depth = depth.astype(np.float32, copy=False)
        out = self.pipeline(image=image, depth_input=depth)
        return {
            "image": np.ascontiguousarray(out["image"]),
            "depth": depth if depth_target is None else depth_target,
            "label": label,
            "depth_input": np.ascontiguousarray(out["depth_input"], dtype=np.float32),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size})"
