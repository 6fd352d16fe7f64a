"""The search space: recipe key -> distribution, read from YAML and checked before any trial runs.

    optim.lr: {float: [1.0e-5, 1.0e-3], log: true}
    loss.depth_weight: {float: [0.0, 0.5]}
    model.decoder_channels: {int: [64, 256], step: 64}
    model.arch: {choice: [fpn, deeplabv3plus]}

Each range's ends and each choice are set on the experiment's recipe and passed through the recipe's own
type check and validator, so a key that does not exist, a value of the wrong type or a range the validator
refuses (a negative learning rate) is one error naming the file and the key. Every sampled recipe is checked
again by the same validator when its trial starts.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from foldwise.io import read_text
from kfold.config import ConfigError, Recipe, all_keys, parse_value, set_key
from kfold.validate import validate_recipe

KINDS = ("float", "int", "choice")


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``float`` / ``int`` in ``[low, high]`` (``log``, ``step``) or a ``choice``."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def sample(self, trial: Any) -> Any:
        """The value an Optuna trial proposes (a list choice travels as its JSON text and comes back decoded)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        encoded = [json.dumps(c) if isinstance(c, list | dict) else c for c in self.choices]
        value = trial.suggest_categorical(self.key, encoded)
        return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value


def _numbers(entry: dict, kind: str, where: str) -> tuple[float, float]:
    bounds = entry[kind]
    number = int if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
        raise ConfigError(f"{where}: {kind} takes [low, high] ({'integers' if kind == 'int' else 'numbers'}), "
                          f"got {bounds!r}")
    low, high = bounds
    if not low < high:
        raise ConfigError(f"{where}: low {low} must be below high {high}")
    if entry.get("log") and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    return low, high


def _dimension(key: str, entry: Any, where: str) -> Dimension:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping like {{float: [low, high]}}, {{int: [low, high]}} or "
                          f"{{choice: [a, b]}}, got {entry!r}")
    kinds = [k for k in KINDS if k in entry]
    unknown = sorted(set(entry) - {*KINDS, "log", "step"})
    if len(kinds) != 1 or unknown:
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)} (with log / step for numbers), got "
                          f"{', '.join(map(str, entry))}")
    kind = kinds[0]
    if kind == "choice":
        choices = entry["choice"]
        if not isinstance(choices, list) or not choices or set(entry) != {"choice"}:
            raise ConfigError(f"{where}: choice takes a non-empty list, alone, got {entry!r}")
        return Dimension(key, kind, choices=tuple(choices))
    low, high = _numbers(entry, kind, where)
    log, step = entry.get("log", False), entry.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | float) or step <= 0 or log):
        raise ConfigError(f"{where}: step must be a positive number, and cannot go with log, got {step!r}")
    return Dimension(key, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high,
                     log, step)


def _values(dim: Dimension) -> list[Any]:
    return list(dim.choices) if dim.kind == "choice" else [dim.low, dim.high]


def read_space(path: str | Path, recipe: Recipe) -> list[Dimension]:
    """Read and check ``path`` against ``recipe`` (the experiment's resolved recipe); one dimension per key.

    Raises:
        ConfigError: naming the file and the key (or the YAML's own line and column).
    """
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of recipe keys to distributions, e.g. "
                          f"optim.lr: {{float: [1.0e-5, 1.0e-3], log: true}}")
    space = []
    for key, entry in data.items():
        where = f"{path}: {key}"
        if str(key) not in all_keys(recipe):
            try:
                set_key(copy.deepcopy(recipe), str(key), None)  # its message names the closest real keys
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
        dim = _dimension(str(key), entry, where)
        for value in _values(dim):
            trial_recipe = copy.deepcopy(recipe)
            try:
                set_key(trial_recipe, dim.key, parse_value(value) if isinstance(value, str) else value)
                validate_recipe(trial_recipe)
            except ConfigError as err:
                raise ConfigError(f"{where}: {value!r} does not fit the recipe ({err})") from None
        space.append(dim)
    return space


def apply(recipe: Recipe, params: dict[str, Any]) -> Recipe:
    """A copy of ``recipe`` with a trial's ``params`` set, validated like a hand-written recipe."""
    out = copy.deepcopy(recipe)
    for key, value in params.items():
        set_key(out, key, value)
    return validate_recipe(out)
