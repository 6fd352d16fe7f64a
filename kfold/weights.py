"""Initial weights from another code base: renamed keys, a non-strict load and a report of what loaded.

    python -m kfold.weights convert IN --map '^backbone\\.=encoder.' [--map ...] --out init.safetensors

``model.init_key_map`` (regex -> replacement, applied in order to every key) renames a foreign checkpoint's keys
when ``--weights_path`` loads it; a key may name the smp model's part (``encoder.``, ``decoder.``,
``segmentation_head.``) or the whole model's (``net.encoder.``). Loading is non-strict: the fold folder's
``init_report.txt`` starts with ``loaded N of M model tensors from FILE`` and lists the missing, unused and
shape-mismatched keys. Files are read weights-only: one that holds pickled objects is refused.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.io import atomic_path, write_text
from kfold.models import read_state_dict

NET_PREFIX = "net."  # SegDepthNet keeps the smp model under .net


@dataclass
class InitReport:
    """What a non-strict load took from ``source``."""

    source: Path
    total: int
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"loaded {len(self.loaded)} of {self.total} model tensors from {self.source}"]
        for title, keys in (("missing (kept at their initial values)", self.missing),
                            ("unused (in the file, not in the model)", self.unused),
                            ("shape-mismatched (not loaded)", self.mismatched)):
            lines += ["", f"{title}: {len(keys)}", *(f"  {k}" for k in keys)]
        return "\n".join(lines) + "\n"


def rename_keys(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``state`` with every ``regex -> replacement`` of ``key_map`` applied to each key, in order."""
    patterns = []
    for pattern, replacement in key_map.items():
        try:
            patterns.append((re.compile(pattern), replacement))
        except re.error as err:
            raise ValueError(f"model.init_key_map: {pattern!r} is not a regular expression ({err})") from None
    renamed: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for original, value in state.items():
        key = original
        for regex, replacement in patterns:
            key = regex.sub(replacement, key)
        if key in renamed:  # a silent overwrite would drop tensors
            raise ValueError(f"model.init_key_map / --map: {source[key]!r} and {original!r} both become {key!r}; "
                             "make the patterns keep keys apart")
        renamed[key], source[key] = value, original
    return renamed


def init_from(model: nn.Module, path: str | Path, key_map: Mapping[str, str] | None = None) -> InitReport:
    """Load what fits of ``path`` into ``model`` (keys renamed by ``key_map``); return the report."""
    own = model.state_dict()
    state = rename_keys(read_state_dict(path), key_map or {})
    report = InitReport(Path(path), len(own))
    take: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = key if key in own else NET_PREFIX + key if NET_PREFIX + key in own else None
        if target is None:
            report.unused.append(key)
        elif tuple(value.shape) != tuple(own[target].shape):
            report.mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(own[target].shape)}")
        else:
            take[target] = value
    report.loaded = sorted(take)
    report.missing = sorted(set(own) - set(take))
    if not take:
        raise ValueError(f"{path}: none of its {len(state)} tensors fits the model (first key "
                         f"{next(iter(state), '-')!r}); set model.init_key_map to rename them")
    model.load_state_dict(take, strict=False)
    return report


def write_init_report(run_dir: Path, report: InitReport) -> None:
    write_text(Path(run_dir) / "init_report.txt", report.text())


def parse_map(items: Sequence[str]) -> dict[str, str]:
    """``--map REGEX=REPLACEMENT`` items as an ordered mapping."""
    key_map = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--map {item!r}: expected REGEX=REPLACEMENT, e.g. '^backbone\\.=encoder.'")
        pattern, replacement = item.split("=", 1)
        key_map[pattern] = replacement
    return key_map


def convert(source: Path, out: Path, key_map: Mapping[str, str]) -> int:
    """Write ``source``'s tensors, keys renamed, as ``out`` (safetensors); return how many."""
    state = {k: v.detach().cpu().contiguous() for k, v in rename_keys(read_state_dict(source), key_map).items()}
    with atomic_path(out) as tmp:
        save_file(state, tmp, {"converted_from": str(source)})
    return len(state)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m kfold.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="rename a checkpoint's keys once, offline, into a safetensors file")
    conv.add_argument("source", type=Path, help="a safetensors file or a weights-only torch checkpoint")
    conv.add_argument("--map", action="append", default=[], metavar="REGEX=REPLACEMENT")
    conv.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    def body() -> None:
        n = convert(args.source, args.out, parse_map(args.map))
        print(f"wrote {args.out}: {n} tensors")

    return run_entry_point(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
