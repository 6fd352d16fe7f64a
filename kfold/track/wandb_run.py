"""A Weights & Biases run per fold: offline unless the user's environment says otherwise (``WANDB_MODE``).

Offline is the default because fold jobs on a cluster often have no route out, and an online run that cannot
reach the server hangs or never syncs (wandb#5561, #2701); the end of each run prints the ``wandb sync``
command that uploads it from a machine that can. group = experiment and job type = fold, so the W&B UI
groups the five folds of an experiment.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfold.track import check_folder

INIT_TIMEOUT_S = 60  # wandb.init gives up after this instead of hanging a fold


class WandbRun:
    """Args:
        folder: where ``wandb/`` is made (the experiment's folder).
        group / job_type / name: the run's W&B group (experiment), job type (``fold<k>``, ``blend``) and name.
        config: the flattened recipe.
        recorded: this run's earlier ids (a resumed fold continues the same run), or None.
    """

    name = "wandb"

    def __init__(self, folder: Path, group: str, job_type: str, name: str, config: Mapping[str, Any],
                 recorded: Mapping[str, str] | None = None) -> None:
        import wandb

        self.mode = os.environ.get("WANDB_MODE") or "offline"
        run_id = (recorded or {}).get("run_id") or secrets.token_hex(4)
        check_folder(Path(folder) / "wandb")  # wandb would log the failure and go on with a run that writes nothing
        settings = wandb.Settings(silent=True, console="off", disable_git=True, init_timeout=INIT_TIMEOUT_S)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "foldwise"), group=group, job_type=job_type,
                              name=name, id=run_id, resume="allow", dir=str(folder), mode=self.mode,
                              config=dict(config), settings=settings, reinit="create_new")
        self.group = group

    def record(self) -> dict[str, str]:
        return {"run_id": self.run.id, "group": self.group, "mode": self.mode, "dir": str(self.run.settings.sync_dir)}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, summary: Mapping[str, float], files: Mapping[str, str], ok: bool) -> None:
        self.run.summary.update(dict(summary))
        sync_dir = self.run.settings.sync_dir
        self.run.finish(exit_code=0 if ok else 1)
        if self.mode == "offline":
            print(f"wandb: offline run {self.run.id} kept; upload it with: wandb sync {sync_dir}", file=sys.stderr,
                  flush=True)
