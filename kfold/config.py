"""The typed recipe: nested dataclasses, presets, `--opts KEY VALUE` overrides and YAML round trip.

Plain dataclasses + ``yaml.safe_load`` rather than a config framework: every value is parsed as YAML (never
evaluated), checked against the field's annotation, and an unknown key names the closest real keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from foldwise.io import read_text

# Choice keys: their Literal types are the one statement of what each accepts (see choices()).
Arch = Literal["fpn", "deeplabv3plus"]
DepthLoss = Literal["l1", "berhu", "none"]
DepthTarget = Literal["sensor", "teacher", "hybrid"]
Weighting = Literal["fixed", "kendall"]
Tracker = Literal["tensorboard", "mlflow", "wandb"]


class ConfigError(ValueError):
    """A recipe key or value that does not fit the recipe; the message names the key."""


@dataclass
class DataConfig:
    root: str = "data/synthetic"
    in_channels: Literal[3, 4] = 3  # 4 = RGB + normalised inverse depth
    input_size: tuple[int, int] = (720, 960)  # (H, W) the image is resized to
    crop_size: tuple[int, int] = (576, 768)  # random training crop of the resized image
    hflip: float = 0.5
    scale_limit: float = 0.1
    rotate_limit: float = 5.0
    color_jitter: float = 0.2
    num_workers: int = 4
    k_folds: int = 5
    fold_seed: int = 42
    class_map: str | None = None  # YAML new_name: [old names] (or a shipped map's name): merge classes on read
    streaming: bool = False  # train from webdataset shards (python -m kfold.data.shards) through a shuffle buffer
    shards: str | None = None  # the shards' folder (default <data root>/shards)
    buffer_batches: int = 16  # streaming: shuffle buffer per loader worker, in batches (--buffer_batches)


@dataclass
class ModelConfig:
    arch: Arch = "fpn"
    encoder: str = "tu-convnext_base"  # any smp encoder or timm encoder as "tu-<name>"
    encoder_weights: str | None = "imagenet"
    decoder_channels: int = 256  # FPN pyramid (segmentation branch: half) or DeepLabV3+ decoder width
    depth_head: bool = True
    sync_bn: bool = False  # BatchNorm -> SyncBatchNorm under DDP (a no-op with a log line in one process)
    init_key_map: dict[str, str] = field(default_factory=dict)  # --weights_path keys: regex -> replacement, in order


@dataclass
class LossConfig:
    class_weights: dict[str, float] = field(default_factory=dict)  # class name -> weight (default 1)
    boundary_weight: float = 1.0  # > 1 = boundary-aware CE
    boundary_width: int = 1
    ohem_fraction: float | None = None  # hard pixel mining: keep this top fraction of pixel losses
    depth_loss: DepthLoss = "l1"
    # max_fraction: c = berhu_c x max residual; percentile: c = the berhu_c quantile of the residuals
    berhu_threshold: Literal["max_fraction", "percentile"] = "max_fraction"
    berhu_c: float | None = None  # None = the reading's usual value: 0.2 (max_fraction) or 0.8 (percentile)
    # teacher: train/teacher_depths; hybrid: the teacher where the sensor has no reading
    depth_target: DepthTarget = "sensor"
    depth_weight: float = 0.1
    weighting: Weighting = "fixed"
    smoothness_weight: float = 0.0


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    encoder_lr_scale: float = 1.0  # encoder lr = lr x this (two-rate optimiser when != 1)
    freeze_encoder_epochs: int = 0
    grad_clip: float | None = None


@dataclass
class ScheduleConfig:
    # iterations: long runs, whose schedule, evaluation and checkpoints count optimiser steps
    unit: Literal["epochs", "iterations"] = "epochs"
    epochs: int = 50
    warmup_epochs: int = 0
    iterations: int = 0  # unit iterations: optimiser steps in all
    warmup_iterations: int = 0
    warmup_lr_ratio: float = 0.01  # warm-up starts at lr x this
    min_lr_ratio: float = 0.0  # cosine ends at lr x this


@dataclass
class TrainConfig:
    batch_size: int = 4
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 where supported, else fp16; fp32 on CPU
    ema_decay: float = 0.999
    ema_warmup: bool = False
    select: Literal["last", "best"] = "last"  # which EMA epoch becomes model.safetensors
    seed: int = 42
    max_steps_per_epoch: int | None = None
    deterministic: bool = False
    eval_every: int = 0  # unit iterations: validate (one metrics.csv row) every N iterations; 0 = at the end
    checkpoint_every: int = 0  # unit iterations: last.pt every N iterations (a multiple of eval_every); 0 = eval_every
    track: tuple[Tracker, ...] = ()  # mirror metrics.csv to these trackers (kfold.track); --track
    mlflow_uri: str | None = None  # None: sqlite:///<runs folder>/mlflow.db


@dataclass
class TTARecipe:
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    hflip: bool = True
    temperatures: tuple[float, ...] = (0.7, 0.8, 0.9, 1.0)  # the per-temperature OOF table
    temperature: float = 1.0  # the one used for the stored probabilities
    max_batch: int = 8
    stride: int = 32


@dataclass
class OOFConfig:
    scale: float = 0.5  # stored probabilities are this fraction of the image size
    batch_size: int = 2
    keep_fold_test: bool = True  # False: delete each fold's test.npy once the experiment's test_mean.npy is whole


@dataclass
class DistillConfig:
    """Distillation from a finished blend (``ensemble.distill``; the teacher of fold k is the blend's fold-k models).

    Loss: the recipe's CE on labelled pixels + alpha x T^2 x KL(teacher || student) on every pixel the teacher
    covers (its probabilities resized with the crop; pixels an augmentation invents are not covered).
    """

    teacher: str | None = None  # a blend's name: submissions/<teacher>.json (null: no distillation)
    alpha: float = 1.0  # weight of the soft-target term
    temperature: float = 1.0  # T of both softmaxes in the KL term
    pseudo_test: bool = False  # also train fold k on the test images with the fold-k teacher's targets
    min_confidence: float = 0.0  # pseudo-labelled pixels whose teacher confidence is below this carry nothing


@dataclass
class Recipe:
    name: str = "exp"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tta: TTARecipe = field(default_factory=TTARecipe)
    oof: OOFConfig = field(default_factory=OOFConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True)
class Preset:
    """What makes a run CPU-sized. ``values`` are set before the experiment's own keys; ``limits`` cap the keys
    that set a run's length and size after them (min(recipe, limit)), so a recipe of 200 epochs of batch 16
    stays a seconds-long smoke run."""

    values: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)


_CPU_SIZED: dict[str, Any] = {
    "data.input_size": (64, 96),
    "data.crop_size": (64, 96),
    "data.num_workers": 0,
    "model.encoder": "resnet18",
    "model.encoder_weights": None,
    "model.decoder_channels": 64,
    "train.batch_size": 4,  # the reference batch: a larger one halves the steps of a short demo run
    "tta.scales": (1.0,),
}
# The keys a preset caps after the experiment's own: those that set a run's length and size.
_LENGTH_KEYS = ("schedule.epochs", "train.batch_size", "optim.freeze_encoder_epochs", "schedule.iterations",
                "schedule.warmup_iterations", "train.eval_every", "train.checkpoint_every")
PRESETS: dict[str, Preset] = {
    "full": Preset(),
    "demo": Preset(
        values={**_CPU_SIZED, "optim.lr": 3e-3, "schedule.epochs": 10, "schedule.warmup_epochs": 1,
                "train.ema_decay": 0.9, "tta.max_batch": 32, "oof.batch_size": 16},
        limits=dict(zip(_LENGTH_KEYS, (10, 4, 2, 400, 40, 40, 40)))),
    "smoke": Preset(
        values={**_CPU_SIZED, "optim.lr": 1e-3, "schedule.epochs": 2, "train.ema_decay": 0.5,
                "train.max_steps_per_epoch": 3, "tta.max_batch": 16, "oof.batch_size": 8},
        limits=dict(zip(_LENGTH_KEYS, (2, 4, 1, 6, 2, 3, 3)))),
}


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def choices() -> dict[str, tuple[Any, ...]]:
    """``{dotted key: allowed values}`` of every key whose annotation is a ``Literal``: the one statement of them
    that the type check, the validator, ``--help`` texts and error messages all read."""
    recipe, found = Recipe(), {}
    for section in dataclasses.fields(recipe):
        value = getattr(recipe, section.name)
        for name, hint in (_field_types(value) if dataclasses.is_dataclass(value) else {}).items():
            if typing.get_origin(hint) is Literal:
                found[f"{section.name}.{name}"] = typing.get_args(hint)
    return found


def all_keys(recipe: Recipe | None = None) -> list[str]:
    """Every dotted key of the recipe, e.g. ``optim.lr``."""
    recipe = recipe or Recipe()
    keys = []
    for section in dataclasses.fields(recipe):
        value = getattr(recipe, section.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(value)]
        else:
            keys.append(section.name)
    return keys


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` (already parsed) against the annotation ``hint``; return it in the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value] if args[-1] is Ellipsis else None
        if value is None or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_coerce(v, t, key) for v, t in zip(value, item_types))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping like {{name: value}}, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], key) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML (``3e-4``, ``[0.5, 1.0]``, ``null``, ``true``); never evaluated."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-4" as a string; accept it as the float a user means.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_key(recipe: Recipe, key: str, value: Any) -> None:
    """Set the dotted ``key`` of ``recipe`` to ``value`` after type checking.

    Args:
        recipe: the recipe to change in place.
        key: a dotted key such as ``optim.lr``.
        value: a parsed value (see :func:`parse_value`).
    """
    keys = all_keys(recipe)
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; keys are {', '.join(keys)}"
        raise ConfigError(f"unknown recipe key {key!r}{hint}")
    target: Any = recipe
    *path, name = key.split(".")
    for part in path:
        target = getattr(target, part)
    setattr(target, name, _coerce(value, _field_types(target)[name], key))


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Apply ``{dotted key: value}`` to ``recipe`` (in place) and return it."""
    for key, value in overrides.items():
        set_key(recipe, key, value)
    return recipe


def parse_opts(pairs: list[str]) -> dict[str, Any]:
    """Turn ``--opts KEY VALUE KEY VALUE`` into ``{key: parsed value}``."""
    if len(pairs) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs; {pairs[-1]!r} has no value")
    return {pairs[i]: parse_value(pairs[i + 1]) for i in range(0, len(pairs), 2)}


def tracker_list(text: str) -> list[str]:
    """``--track tensorboard,mlflow`` as a list (``none``: no tracker); the names are checked as ``train.track``."""
    return [] if text.strip() == "none" else [part.strip() for part in text.split(",")]


def build_recipe(base: dict[str, Any], preset: str = "full", opts: dict[str, Any] | None = None) -> Recipe:
    """The resolved recipe: defaults, the preset, the experiment's ``base``, the preset's limits, then ``opts``.

    Args:
        base: the experiment's own differences, as dotted keys.
        preset: ``full``, ``demo`` or ``smoke``.
        opts: command-line overrides, applied last.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
    recipe = apply_overrides(Recipe(), PRESETS[preset].values)
    apply_overrides(recipe, base)
    for key, limit in PRESETS[preset].limits.items():
        section, name = key.split(".")
        setattr(getattr(recipe, section), name, min(getattr(getattr(recipe, section), name), limit))
    return apply_overrides(recipe, opts or {})


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain YAML-able data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(recipe))


def from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Rebuild a recipe from :func:`to_dict` output (e.g. a run's ``config.yaml``), type-checked."""
    recipe = Recipe()
    for section, values in data.items():
        if isinstance(values, dict) and dataclasses.is_dataclass(getattr(recipe, section, None)):
            for name, value in values.items():
                set_key(recipe, f"{section}.{name}", value)
        else:
            set_key(recipe, section, values)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a ``config.yaml`` written by a run (its ``recipe`` section)."""
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or "recipe" not in data:
        raise ConfigError(f"{path}: no 'recipe' section")
    try:
        return from_dict(data["recipe"], source=str(path))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
