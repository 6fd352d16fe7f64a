"""Augmentation keeps RGB, depth and labels aligned; the dataset serves collatable tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from foldwise.io import write_png
from kfold.data.dataset import IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset, inverse_depth
from kfold.data.layout import DataError, DataRoot, open_root
from kfold.data.transforms import EvalTransform, TrainTransform

H, W = 48, 64
NUM_CLASSES = 13
# Far-apart colours, so the class of an (interpolated) image pixel can be read back from its colour.
PALETTE = np.array(
    [[(c * 97) % 256, (c * 53 + 40) % 256, (c * 181 + 90) % 256] for c in range(NUM_CLASSES)], dtype=np.uint8
)


def blocky_label(rng: np.random.Generator, h: int = H, w: int = W, block: int = 8) -> np.ndarray:
    coarse = rng.integers(0, NUM_CLASSES, (h // block, w // block))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64)).astype(np.uint8)


def depth_of(label: np.ndarray) -> np.ndarray:
    """Depth in metres derived from the class, so depth/label alignment can be checked exactly."""
    return ((label.astype(np.float32) + 1) * 0.5).astype(np.float32)


def sample(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    label = blocky_label(np.random.default_rng(seed))
    return PALETTE[label], depth_of(label), label


def classes_from_colour(image: np.ndarray) -> np.ndarray:
    dist = ((image[..., None, :].astype(np.int32) - PALETTE.astype(np.int32)) ** 2).sum(-1)
    return dist.argmin(-1)


def make_root(path: Path, test_labels: bool = True) -> Path:
    """6 train and 2 test frames of 48x64; depth 0 (missing) in the first two rows."""
    rng = np.random.default_rng(1)
    for split, ids in (("train", [f"r{i}_v0" for i in range(6)]), ("test", ["t0", "t1"])):
        for image_id in ids:
            label = blocky_label(rng)
            depth_mm = np.round(depth_of(label) * 1000).astype(np.uint16)
            depth_mm[:2] = 0
            label[-1] = 255
            write_png(path / split / "images" / f"{image_id}.png", PALETTE[np.minimum(label, 12)])
            write_png(path / split / "depths" / f"{image_id}.png", depth_mm)
            if split == "train" or test_labels:
                labels = path / ("train/labels" if split == "train" else "test_labels")
                write_png(labels / f"{image_id}.png", label)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> DataRoot:
    return open_root(make_root(tmp_path_factory.mktemp("ds") / "root"))


# ---------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("seed", range(4))
def test_train_transform_keeps_image_depth_label_aligned(seed: int) -> None:
    image, depth, label = sample(seed)
    t = TrainTransform((56, 72), (40, 56), hflip=0.5, scale_limit=0.2, rotate_limit=20, color_jitter=0.0, seed=seed)
    for _ in range(5):
        out = t(image=image, depth=depth, label=label)
        assert out["image"].shape == (40, 56, 3) and out["image"].dtype == np.uint8
        assert out["depth"].shape == out["label"].shape == (40, 56)
        assert out["depth"].dtype == np.float32 and out["label"].dtype == np.uint8
        np.testing.assert_array_equal(out["depth_input"], out["depth"])
        lab, dep = out["label"], out["depth"]
        # Nearest interpolation only: no new values; filled regions are ignore / missing, and together.
        assert set(np.unique(lab)) <= set(np.unique(label)) | {255}
        assert set(np.unique(dep)) <= set(np.unique(depth)) | {0.0}
        np.testing.assert_array_equal(lab == 255, dep == 0)
        valid = lab != 255
        np.testing.assert_array_equal(dep[valid], depth_of(lab)[valid])
        # The image moved with the label: its colours give back the class almost everywhere
        # (interpolated pixels at block edges may not).
        agree = (classes_from_colour(out["image"]) == lab)[valid].mean()
        assert agree > 0.9, agree


def test_rotation_fills_ignore_and_missing() -> None:
    image, depth, label = sample()
    t = TrainTransform((H, W), (H, W), hflip=0.0, scale_limit=0.0, rotate_limit=30, color_jitter=0.0, seed=3)
    filled = [(t(image=image, depth=depth, label=label)["label"] == 255).mean() for _ in range(8)]
    assert max(filled) > 0.02  # some rotation of up to 30 degrees leaves corners uncovered


def test_hflip_exact_and_padding() -> None:
    image, depth, label = sample()
    t = TrainTransform((H, W), (H, W), hflip=1.0, scale_limit=0.0, rotate_limit=0.0, color_jitter=0.0)
    out = t(image=image, depth=depth, label=label)
    np.testing.assert_array_equal(out["image"], image[:, ::-1])
    np.testing.assert_array_equal(out["label"], label[:, ::-1])
    np.testing.assert_array_equal(out["depth"], depth[:, ::-1])
    # A crop bigger than the input is padded: image 0, label 255, depth 0 (missing).
    t = TrainTransform((H, W), (H + 8, W + 8), hflip=0.0, scale_limit=0.0, rotate_limit=0.0, color_jitter=0.0)
    out = t(image=image, depth=depth, label=label)
    assert out["label"].shape == (H + 8, W + 8)
    np.testing.assert_array_equal(out["label"][4:-4, 4:-4], label)
    np.testing.assert_array_equal(out["depth"][4:-4, 4:-4], depth)
    assert (out["label"][:4] == 255).all() and (out["depth"][:, :4] == 0).all() and (out["image"][:4] == 0).all()


def test_color_jitter_touches_rgb_only_and_seed_reproduces() -> None:
    image, depth, label = sample()
    kwargs = dict(hflip=0.0, scale_limit=0.0, rotate_limit=0.0, color_jitter=0.4, seed=7)
    a = TrainTransform((H, W), (H, W), **kwargs)(image=image, depth=depth, label=label)
    b = TrainTransform((H, W), (H, W), **kwargs)(image=image, depth=depth, label=label)
    assert not np.array_equal(a["image"], image)
    np.testing.assert_array_equal(a["label"], label)
    np.testing.assert_array_equal(a["depth"], depth)
    np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_transform_resizes_inputs_only() -> None:
    image, depth, label = sample()
    depth[:3] = 0.0
    out = EvalTransform((32, 40))(image=image, depth=depth, label=label)
    assert out["image"].shape == (32, 40, 3) and out["depth_input"].shape == (32, 40)
    assert out["label"].shape == (H, W) and out["depth"].shape == (H, W)
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_array_equal(out["depth"], depth)
    assert set(np.unique(out["depth_input"])) <= set(np.unique(depth))
    assert (out["depth_input"][0] == 0).all()  # missing stays missing


def test_transform_arguments_checked() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform((H, W), (0, W))
    with pytest.raises(ValueError, match="hflip"):
        TrainTransform((H, W), (H, W), hflip=1.5)
    with pytest.raises(ValueError, match="input_size"):
        EvalTransform((H,))


# ----------------------------------------------------------------------------------------------- dataset
@pytest.mark.parametrize("in_channels", [3, 4])
def test_eval_dataset_shapes_dtypes_and_collate(root: DataRoot, in_channels: int) -> None:
    ds = SegmentationDataset(root, "train", root.train_ids, EvalTransform((32, 40)), in_channels=in_channels)
    item = ds[0]
    assert item["image"].shape == (in_channels, 32, 40) and item["image"].dtype == torch.float32
    assert item["depth"].shape == (1, H, W) and item["depth"].dtype == torch.float32
    assert item["label"].shape == (H, W) and item["label"].dtype == torch.int64
    assert item["id"] == root.train_ids[0]
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, in_channels, 32, 40) and batch["label"].shape == (3, H, W)
    assert batch["id"] == list(root.train_ids[:3])


def test_values_normalisation_and_inverse_depth(root: DataRoot) -> None:
    ds = SegmentationDataset(root, "train", root.train_ids, None, in_channels=4, min_depth_m=0.5)
    item, (image, depth, label) = ds[1], ds.read(1)
    x = item["image"].numpy()
    expected = (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[:3], expected.transpose(2, 0, 1), atol=1e-5)
    inv = x[3]
    assert (inv[:2] == 0).all() and (item["depth"][0, :2] == 0).all()  # missing depth stays 0
    assert inv.min() >= 0 and inv.max() <= 1
    np.testing.assert_allclose(inv[2:], np.minimum(0.5 / depth[2:], 1.0), rtol=1e-6)
    np.testing.assert_array_equal(item["label"].numpy(), label)
    assert (item["label"][-1] == 255).all()


def test_train_dataset_crops_everything(root: DataRoot) -> None:
    t = TrainTransform((H, W), (32, 32), seed=0)
    ds = SegmentationDataset(root, "train", root.train_ids[:4], t, in_channels=4)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 4, 32, 32)
    assert batch["depth"].shape == (4, 1, 32, 32) and batch["label"].shape == (4, 32, 32)
    # The 4th channel is the inverse of the (cropped) target depth, pixel for pixel.
    np.testing.assert_array_equal(batch["image"][:, 3].numpy(), inverse_depth(batch["depth"][:, 0].numpy(), 0.25))


def test_workers_draw_different_augmentations(root: DataRoot) -> None:
    same = [root.train_ids[0]] * 4
    t = TrainTransform((H, W), (32, 32), color_jitter=0.0)
    ds = SegmentationDataset(root, "train", same, t)
    loader = DataLoader(ds, batch_size=1, num_workers=2)
    labels = [b["label"][0] for b in loader]  # items 0 and 1 come from different workers
    assert not torch.equal(labels[0], labels[1])


class ReseedEach(torch.utils.data.Dataset):
    """Seeds every sample's augmentation from its index, as kfold.train does for exact resumes."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        self.dataset.transform.reseed(index % 2)
        return self.dataset[index]


def test_explicit_reseed_wins_over_worker_seeding(root: DataRoot) -> None:
    same = [root.train_ids[0]] * 4
    ds = ReseedEach(SegmentationDataset(root, "train", same, TrainTransform((H, W), (32, 32))))
    in_main = [ds[i]["label"] for i in range(4)]
    assert torch.equal(in_main[0], in_main[2]) and not torch.equal(in_main[0], in_main[1])
    in_workers = [b["label"][0] for b in DataLoader(ds, batch_size=1, num_workers=2)]
    for a, b in zip(in_main, in_workers):
        assert torch.equal(a, b)


def test_unlabelled_splits_give_ignore(root: DataRoot, tmp_path: Path) -> None:
    ds = SegmentationDataset(root, "test", root.test_ids, EvalTransform((H, W)), with_labels=False)
    assert (ds[0]["label"] == 255).all()
    assert not (SegmentationDataset(root, "test", root.test_ids, None)[0]["label"] == 255).all()
    bare = open_root(make_root(tmp_path / "bare", test_labels=False))
    assert not bare.has_test_labels
    ds = SegmentationDataset(bare, "test", bare.test_ids, EvalTransform((32, 40)), in_channels=4)
    item = ds[1]
    assert item["label"].shape == (H, W) and (item["label"] == 255).all() and item["id"] == "t1"


def test_far_depth_is_missing(root: DataRoot) -> None:
    ds = SegmentationDataset(root, "train", root.train_ids, None, max_depth_m=3.0)
    depth = ds[0]["depth"]
    assert depth.max() <= 3.0 and (depth == 0).sum() > 2 * W


def test_bad_arguments(root: DataRoot) -> None:
    for channels in (1, 5):
        with pytest.raises(ValueError, match="in_channels"):
            SegmentationDataset(root, "train", root.train_ids, None, in_channels=channels)
    with pytest.raises(ValueError, match="split"):
        SegmentationDataset(root, "valid", root.train_ids, None)
    with pytest.raises(DataError, match="'t0' is not in the train split"):
        SegmentationDataset(root, "train", ["t0"], None)


class FakeTeacher:
    """Teacher probabilities at half the image size: class = a column band, confident only on the left half."""

    def probs(self, split: str, image_id: str) -> np.ndarray:
        probs = np.full((NUM_CLASSES, H // 2, W // 2), 0.1 / (NUM_CLASSES - 1), dtype=np.float32)
        probs[:, :, W // 4 :] = 1.0 / NUM_CLASSES
        probs[3, :, : W // 4] = 0.9
        return probs

    def ids(self, split: str) -> list[str]:
        return ["t0", "t1"]


def test_soft_targets_move_with_the_label_and_pseudo_labels_need_confidence(root: DataRoot) -> None:
    flip = TrainTransform((H, W), (H, W), hflip=1.0, scale_limit=0.0, rotate_limit=0.0, color_jitter=0.0)
    train = SegmentationDataset(root, "train", ["r0_v0"], flip, teacher=FakeTeacher())
    item = train[0]
    assert item["soft"].shape == (NUM_CLASSES, H, W) and item["soft"].dtype == torch.float32
    assert torch.allclose(item["soft"].sum(0), torch.ones(H, W), atol=1e-5)
    assert (item["soft"][3, :, -4:] > 0.85).all()  # the confident left half, flipped to the right
    labelled = SegmentationDataset(root, "train", ["r0_v0"], flip)[0]["label"]
    assert torch.equal(item["label"], labelled)  # a training image keeps its own labels

    pseudo = SegmentationDataset(root, "test", ["t0"], flip, with_labels=False, teacher=FakeTeacher(),
                                 min_confidence=0.5)[0]
    assert set(pseudo["label"][:, -4:].unique().tolist()) == {3}  # confident: the teacher's class
    assert (pseudo["label"][:, :4] == 255).all() and (pseudo["soft"][:, :, :4] == 0).all()  # below: nothing
    assert (pseudo["depth"] == 0).all()  # no depth supervision from test images


def test_soft_targets_stay_on_their_pixels_under_the_whole_augmentation() -> None:
    image, depth, label = sample()
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[np.minimum(label, NUM_CLASSES - 1)]
    t = TrainTransform((H, W), (H - 16, W - 16), scale_limit=0.2, rotate_limit=10)
    for seed in range(6):
        t.reseed(seed)
        out = t(image=image, depth=depth, label=label, soft=one_hot)
        valid = out["label"] != 255
        assert (out["soft"].argmax(-1)[valid] == out["label"][valid]).all()
        assert (out["soft"].sum(-1)[~valid] == 0).all()  # invented pixels carry no target
