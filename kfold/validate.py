"""Fail-fast checks of a resolved recipe: every range and relation, before any data is read or model built.

A bad value found hours into a GPU run (or never: a negative batch size that trains with batch 1) costs far
more than a check here. Types are already checked by :mod:`kfold.config`; this module checks values and
names the key. It imports nothing heavy, so a bad ``--opts`` value is answered before torch is imported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from foldwise.cli import NAME
from kfold.config import ConfigError, Recipe, choices

if TYPE_CHECKING:
    from kfold.data.layout import DataRoot

# The values each choice key accepts: the recipe's Literal annotations (kfold.config.choices).
CHOICES: dict[str, tuple[Any, ...]] = choices()


def _at_least(low: float) -> Callable[[float], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _above(low: float) -> Callable[[float], str | None]:
    return lambda v: None if v > low else f"must be > {low}"


def _within(low: float, high: float, *, open_high: bool = False, open_low: bool = False) -> Callable:
    def check(v: float) -> str | None:
        ok_low = v > low if open_low else v >= low
        ok_high = v < high if open_high else v <= high
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        return None if ok_low and ok_high else f"must be in {left}{low}, {high}{right}"

    return check


# key -> check of one value (applied to every item of a tuple); None values of optional keys are skipped.
RANGES: dict[str, Callable[[Any], str | None]] = {
    "data.input_size": _at_least(1),
    "data.crop_size": _at_least(1),
    "data.hflip": _within(0, 1),
    "data.scale_limit": _within(0, 1, open_high=True),
    "data.rotate_limit": _within(0, 180),
    "data.color_jitter": _within(0, 1),
    "data.num_workers": _at_least(0),
    "data.buffer_batches": _at_least(1),
    "data.k_folds": _at_least(2),
    "model.decoder_channels": _at_least(1),
    "loss.boundary_weight": _above(0),
    "loss.boundary_width": _at_least(1),
    "loss.ohem_fraction": _within(0, 1, open_low=True),
    "loss.depth_weight": _at_least(0),
    "loss.berhu_c": _within(0, 1, open_low=True),
    "loss.smoothness_weight": _at_least(0),
    "optim.lr": _above(0),
    "optim.weight_decay": _at_least(0),
    "optim.momentum": _within(0, 1, open_high=True),
    "optim.encoder_lr_scale": _at_least(0),
    "optim.freeze_encoder_epochs": _at_least(0),
    "optim.grad_clip": _above(0),
    "schedule.epochs": _at_least(1),
    "schedule.warmup_epochs": _at_least(0),
    "schedule.iterations": _at_least(0),
    "schedule.warmup_iterations": _at_least(0),
    "train.eval_every": _at_least(0),
    "train.checkpoint_every": _at_least(0),
    "schedule.warmup_lr_ratio": _within(0, 1, open_low=True),
    "schedule.min_lr_ratio": _within(0, 1),
    "train.batch_size": _at_least(1),
    "train.ema_decay": _within(0, 1, open_high=True),
    "train.seed": _at_least(0),
    "train.max_steps_per_epoch": _at_least(1),
    "tta.scales": _above(0),
    "tta.temperatures": _above(0),
    "tta.temperature": _above(0),
    "tta.max_batch": _at_least(1),
    "tta.stride": _at_least(1),
    "oof.scale": _within(0, 1, open_low=True),
    "oof.batch_size": _at_least(1),
    "distill.alpha": _at_least(0),
    "distill.temperature": _above(0),
    "distill.min_confidence": _within(0, 1, open_high=True),
}


def get_key(recipe: Recipe, key: str) -> Any:
    """The value of a dotted key such as ``optim.lr``."""
    value: Any = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_value(key: str, value: Any, check: Callable[[Any], str | None]) -> None:
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        problem = check(item)
        if problem:
            raise ConfigError(f"{key}: {problem}, got {value!r}")


def _check_relations(recipe: Recipe) -> None:
    data, loss = recipe.data, recipe.loss
    if any(c > i for c, i in zip(data.crop_size, data.input_size)):
        raise ConfigError(f"data.crop_size: {list(data.crop_size)} must fit inside data.input_size "
                          f"{list(data.input_size)}")
    if recipe.model.arch == "fpn" and recipe.model.decoder_channels % 64:
        # smp's FPN segmentation branch (half the width) uses GroupNorm with 32 groups.
        raise ConfigError(f"model.decoder_channels: FPN needs a multiple of 64, got {recipe.model.decoder_channels}")
    if not recipe.model.encoder.strip():
        raise ConfigError("model.encoder: must name an encoder, got an empty string")
    # No relation to schedule.epochs: the smoke preset shrinks epochs below a recipe's warm-up or freeze.
    if loss.weighting == "kendall" and (loss.depth_loss == "none" or not recipe.model.depth_head):
        raise ConfigError("loss.weighting: kendall balances two tasks and needs loss.depth_loss l1 or berhu "
                          "with model.depth_head true")
    if recipe.data.class_map is not None and not recipe.data.class_map.strip():
        raise ConfigError("data.class_map: give a file (or a shipped map name), or null for the root's classes")
    for pattern in recipe.model.init_key_map:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"model.init_key_map: {pattern!r} is not a regular expression ({err})") from None
    _check_iterations(recipe)
    _check_tracking(recipe)
    _check_distill(recipe)
    if not recipe.tta.scales:
        raise ConfigError("tta.scales: give at least one scale, e.g. [1.0]")
    for name, weight in loss.class_weights.items():
        _check_value(f"loss.class_weights.{name}", weight, _at_least(0))


def _check_iterations(recipe: Recipe) -> None:
    sched, train = recipe.schedule, recipe.train
    if sched.unit != "iterations":
        return
    if sched.iterations < 1:
        raise ConfigError("schedule.iterations: schedule.unit iterations needs at least 1 iteration")
    if sched.warmup_iterations >= sched.iterations:
        raise ConfigError(f"schedule.warmup_iterations: {sched.warmup_iterations} must be below schedule.iterations "
                          f"({sched.iterations})")
    every = train.eval_every or sched.iterations
    if train.checkpoint_every and train.checkpoint_every % every:
        raise ConfigError(f"train.checkpoint_every: {train.checkpoint_every} must be a multiple of train.eval_every "
                          f"({every}): checkpoints are written at evaluations")
    if recipe.optim.freeze_encoder_epochs:
        raise ConfigError("optim.freeze_encoder_epochs: counts epochs; set it to 0 with schedule.unit iterations")


def _check_tracking(recipe: Recipe) -> None:
    track = recipe.train.track
    if len(set(track)) != len(track):
        raise ConfigError(f"train.track: {list(track)} names a tracker twice")
    uri = recipe.train.mlflow_uri
    if uri is not None and not re.match(r"[a-z][a-z0-9+.-]*:", uri):
        raise ConfigError(f"train.mlflow_uri: {uri!r} is not a URI; e.g. sqlite:///runs/mlflow.db or http://host:5000")


def _check_distill(recipe: Recipe) -> None:
    d = recipe.distill
    if d.teacher is None:
        if d.pseudo_test:
            raise ConfigError("distill.pseudo_test: pseudo-labels come from a teacher; set distill.teacher to a blend")
        return
    if not NAME.fullmatch(d.teacher):
        raise ConfigError(f"distill.teacher: {d.teacher!r} is not a blend name (submissions/<name>.json)")
    if recipe.data.streaming:
        raise ConfigError("distill.teacher: distillation reads the root's images (the teacher targets are kept per "
                          "fold beside the run); set data.streaming false")


def validate_recipe(recipe: Recipe) -> Recipe:
    """Check every value of ``recipe`` and the relations between keys; raise :class:`ConfigError` naming the key.

    Args:
        recipe: a fully resolved recipe (defaults, preset, experiment, flags, ``--opts``).

    Returns:
        The same recipe, for chaining.
    """
    for key, allowed in CHOICES.items():
        if get_key(recipe, key) not in allowed:
            raise ConfigError(f"{key}: {get_key(recipe, key)!r} is not one of {', '.join(map(str, allowed))}")
    for key, check in RANGES.items():
        value = get_key(recipe, key)
        if value is not None:
            _check_value(key, value, check)
    _check_relations(recipe)
    return recipe


def fit_recipe_to_root(recipe: Recipe, root: DataRoot) -> list[str]:
    """Check the recipe against the opened root (before any model is built); adapt it to an RGB-only root.

    A root without ``depths/`` trains with the depth head, depth loss, Kendall weighting and smoothness off
    (returned as a note to log); a recipe that needs what the root lacks fails naming the folder.

    Returns:
        Notes for the log.
    """
    if recipe.data.in_channels == 4 and not root.has_depth:
        raise ConfigError(f"{root.path / 'train' / 'depths'}: missing folder; data.in_channels 4 (RGB + depth) "
                          f"needs depth maps, and this is an RGB-only root")
    if recipe.loss.depth_target != "sensor" and not root.has_teacher:
        raise ConfigError(f"{root.teacher_dir}: missing folder; loss.depth_target {recipe.loss.depth_target} needs "
                          f"a depth teacher's prediction per train image (<id>.png in mm or <id>.npy in metres)")
    unknown = sorted(set(recipe.loss.class_weights) - set(root.classes))
    if unknown:
        raise ConfigError(f"loss.class_weights: unknown class {unknown[0]!r}; classes are {', '.join(root.classes)}")
    if recipe.data.streaming:
        from kfold.data.shards import check_matches, read_index  # webdataset: only for streaming recipes

        check_matches(read_index(recipe.data.shards or root.path / "shards"), root, root.train_ids)
    notes = []
    if not root.has_depth and recipe.model.depth_head:
        recipe.model.depth_head = False
        recipe.loss.weighting, recipe.loss.smoothness_weight = "fixed", 0.0
        notes.append(f"{root.path}: no depths/ folder (an RGB-only root): depth head, depth loss, Kendall "
                     f"weighting and smoothness are off")
    return notes
