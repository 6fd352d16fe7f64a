"""Torch dataset over one split of a :class:`~kfold.data.layout.DataRoot`."""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kfold.config import DepthTarget
from kfold.data.layout import IGNORE_INDEX, SPLITS, DataError, DataRoot, read_depth, read_rgb

if typing.TYPE_CHECKING:
    from kfold.store.teacher import TeacherTargets

DEPTH_TARGETS = typing.get_args(DepthTarget)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

Transform = Callable[..., dict[str, np.ndarray]]


def normalize_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) normalised with the ImageNet mean and std."""
    x = (image.astype(np.float32) / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def inverse_depth(depth: np.ndarray, min_depth_m: float) -> np.ndarray:
    """Depth in metres -> ``min_depth_m / depth`` clipped to [0, 1]; missing (0) stays 0.

    Inverse depth spends the channel's range on near surfaces, where the detail is.
    """
    valid = depth > 0
    inv = np.zeros_like(depth, dtype=np.float32)
    inv[valid] = np.minimum(np.float32(min_depth_m) / depth[valid], 1.0)
    return inv


def network_input(out: dict[str, np.ndarray], in_channels: int, min_depth_m: float = 0.25) -> torch.Tensor:
    """The network's input from a transform's output: normalised RGB, plus inverse depth as a 4th channel."""
    x = normalize_rgb(out["image"])
    if in_channels == 4:
        x = np.concatenate([x, inverse_depth(out["depth_input"], min_depth_m)[None]], axis=0)
    return torch.from_numpy(x)


def model_input(image: np.ndarray, depth: np.ndarray | None, transform: Transform, in_channels: int,
                max_depth_m: float = 10.0, min_depth_m: float = 0.25) -> torch.Tensor:
    """One image outside any dataset root (``ensemble.predict``), prepared as :class:`SegmentationDataset` does.

    Args:
        image: uint8 (H, W, 3) RGB. depth: float32 (H, W) metres (0 = missing), or None for an RGB model.
        transform: the evaluation transform (e.g. ``EvalTransform(recipe.data.input_size)``).
        in_channels / max_depth_m / min_depth_m: as for :class:`SegmentationDataset`.
    """
    depth = np.zeros(image.shape[:2], np.float32) if depth is None else depth.copy()
    depth[depth > max_depth_m] = 0.0
    label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    return network_input(transform(image=image, depth=depth, label=label), in_channels, min_depth_m)


def _identity(image: np.ndarray, depth: np.ndarray, label: np.ndarray,
              depth_target: np.ndarray | None = None) -> dict[str, np.ndarray]:
    target = depth if depth_target is None else depth_target
    return {"image": image, "depth": target, "label": label, "depth_input": depth}


class SegmentationDataset(Dataset):
    """Samples of one split as tensors.

    Each item is a dict: ``image`` float32 (in_channels, h, w) (ImageNet-normalised RGB, plus normalised
    inverse depth as 4th channel when ``in_channels == 4``), ``depth`` float32 (1, H, W) metres with
    0 = missing, ``label`` int64 (H, W) with 255 = ignore, ``id`` str.

    Args:
        root: the opened dataset root.
        split: "train" or "test".
        ids: the ids to serve, in order (e.g. one fold's validation ids).
        transform: ``t(image=, depth=, label=) -> dict(image, depth, label, depth_input)``, e.g.
            :func:`kfold.data.transforms.TrainTransform`; None keeps every array as read.
        in_channels: 3 (RGB) or 4 (RGB + inverse depth).
        with_labels: read labels; when False, or when the split has none (test without ``test_labels/``),
            every label pixel is 255.
        max_depth_m: readings beyond this are treated as missing (sensor range).
        min_depth_m: the depth that maps to 1.0 in the inverse-depth channel.
        depth_target: what ``depth`` holds: ``sensor``, ``teacher`` (``train/teacher_depths``) or ``hybrid``
            (the teacher where it has a reading, else the sensor); the 4th input channel is always the sensor.
        teacher: a fold's teacher targets (distillation): each item gains ``soft`` float32 (C, H, W), the
            teacher's probabilities at the label size. On the test split they are pseudo-labels: the label is
            the teacher's class where its confidence reaches ``min_confidence``, pixels below it carry neither
            label nor soft target, and the depth target is empty (no depth supervision from test images).
        min_confidence: see ``teacher``.
    """

    def __init__(
        self,
        root: DataRoot,
        split: str,
        ids: Sequence[str],
        transform: Transform | None,
        in_channels: int = 3,
        with_labels: bool = True,
        max_depth_m: float = 10.0,
        min_depth_m: float = 0.25,
        depth_target: str = "sensor",
        teacher: TeacherTargets | None = None,
        min_confidence: float = 0.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if in_channels not in (3, 4):
            raise ValueError(f"in_channels must be 3 (RGB) or 4 (RGB + inverse depth), got {in_channels}")
        if depth_target not in DEPTH_TARGETS:
            raise ValueError(f"depth_target must be one of {DEPTH_TARGETS}, got {depth_target!r}")
        if depth_target != "sensor" and not root.has_teacher:
            raise DataError(f"{root.teacher_dir}: missing folder; loss.depth_target {depth_target} needs a depth "
                            f"teacher's prediction per train image (<id>.png in mm or <id>.npy in metres)")
        if in_channels == 4 and not root.has_depth:
            raise DataError(f"{root.path / split / 'depths'}: missing folder; a 4-channel (RGB + depth) recipe "
                            f"needs depth maps (this is an RGB-only root)")
        if not 0 < min_depth_m < max_depth_m:
            raise ValueError(f"need 0 < min_depth_m < max_depth_m, got {min_depth_m} and {max_depth_m}")
        known = set(root.ids(split))
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DataError(
                f"{root.image_path(split, unknown[0])}: id {unknown[0]!r} is not in the {split} split "
                f"of {root.path} ({len(unknown)} unknown ids)"
            )
        self.root = root
        self.split = split
        self.ids = list(ids)
        self.transform = transform if transform is not None else _identity
        self.in_channels = in_channels
        self.labelled = with_labels and (split == "train" or root.has_test_labels)
        self.max_depth_m = max_depth_m
        self.min_depth_m = min_depth_m
        self.depth_target = depth_target
        self.teacher, self.min_confidence = teacher, float(min_confidence)

    def __len__(self) -> int:
        return len(self.ids)

    def _check_size(self, path: Any, array: np.ndarray) -> None:
        # A root opened with verify=False was not size-checked; fail here rather than in collate.
        if array.shape[:2] != self.root.image_size:
            h, w = self.root.image_size
            raise DataError(f"{path}: size {array.shape[0]}x{array.shape[1]} (HxW) differs from the root's {h}x{w}")

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The raw arrays of sample ``index``: RGB uint8, depth float32 metres (0 = missing), label uint8."""
        image_id = self.ids[index]
        image = read_rgb(self.root.image_path(self.split, image_id))
        depth = read_depth(self.root.depth_path(self.split, image_id)) if self.root.has_depth else None
        label = self.root.label(self.split, image_id) if self.labelled else None
        return self.checked(image_id, image, depth, label)

    def checked(self, image_id: str, image: np.ndarray, depth: np.ndarray | None, label: np.ndarray | None,
                names: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded arrays made ready as :meth:`read` returns them: sizes checked, far depth dropped, and a
        zero depth (RGB-only root) or all-ignore label (unlabelled split) where None.

        Args:
            names: "image" / "depth" / "label" -> what a size error names (default: the root's file paths).
        """
        where = names or {"image": self.root.image_path(self.split, image_id),
                          "depth": self.root.depth_path(self.split, image_id),
                          "label": self.root.label_path(self.split, image_id)}
        self._check_size(where["image"], image)
        if depth is None:  # an RGB-only root: every pixel "no reading"
            depth = np.zeros(image.shape[:2], dtype=np.float32)
        else:
            self._check_size(where["depth"], depth)
            depth[depth > self.max_depth_m] = 0.0
        if label is None or not self.labelled:
            label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        else:
            self._check_size(where["label"], label)
        return image, depth, label

    def target_depth(self, index: int, sensor: np.ndarray, teacher: np.ndarray | None = None) -> np.ndarray | None:
        """The depth the loss learns from when it is not the sensor's: the teacher's, or hybrid.

        Args:
            teacher: the teacher's depth when already decoded (a streamed sample); default: read from the root.
        """
        if self.depth_target == "sensor":
            return None
        teacher = self.root.teacher_depth(self.ids[index]) if teacher is None else teacher
        teacher[teacher > self.max_depth_m] = 0.0
        return teacher if self.depth_target == "teacher" else np.where(teacher > 0, teacher, sensor)

    def soft_targets(self, index: int, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the teacher's probabilities (H, W, C) at the label size, the label): resized bilinearly as the
        blend resizes its stores; on the test split the label is the pseudo-label (see ``teacher``)."""
        probs = torch.from_numpy(self.teacher.probs(self.split, self.ids[index]))[None]
        probs = F.interpolate(probs, size=label.shape, mode="bilinear", align_corners=False)[0]
        if self.split == "test":
            confidence, pseudo = probs.max(0)
            confident = confidence >= self.min_confidence
            label = torch.where(confident, pseudo, IGNORE_INDEX).numpy().astype(np.uint8)
            probs = probs * confident
        return np.ascontiguousarray(probs.permute(1, 2, 0).numpy()), label

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, depth, label = self.read(index)
        if self.teacher is None:
            return self.item(index, image, depth, label, self.target_depth(index, depth))
        soft, label = self.soft_targets(index, label)
        target = np.zeros_like(depth) if self.split == "test" else self.target_depth(index, depth)
        return self.item(index, image, depth, label, target, soft)

    def item(self, index: int, image: np.ndarray, depth: np.ndarray, label: np.ndarray,
             target: np.ndarray | None, soft: np.ndarray | None = None) -> dict[str, Any]:
        """Sample ``index`` as tensors from its arrays (see :meth:`read`, :meth:`target_depth` and
        :meth:`soft_targets`)."""
        extra = {} if soft is None else {"soft": soft}
        if target is None:
            out = self.transform(image=image, depth=depth, label=label, **extra)
        else:  # the input channel keeps the sensor (what a test image has); the loss sees the target
            out = self.transform(image=image, depth=depth, label=label, depth_target=target, **extra)
        sample = {
            "image": network_input(out, self.in_channels, self.min_depth_m),
            "depth": torch.from_numpy(np.ascontiguousarray(out["depth"], dtype=np.float32)[None]),
            "label": torch.from_numpy(np.ascontiguousarray(out["label"]).astype(np.int64)),
            "id": self.ids[index],
        }
        if soft is not None:
            sample["soft"] = torch.from_numpy(np.ascontiguousarray(out["soft"].transpose(2, 0, 1)))
        return sample
