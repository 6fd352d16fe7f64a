"""A TensorBoard event folder per fold (``torch.utils.tensorboard``; the ``tensorboard`` package writes the events).

Scalars go at each ``metrics.csv`` row's step; the recipe and the fold's final metrics go in as hparams in the
same folder (not the timestamped sub-folder ``SummaryWriter.add_hparams`` makes), so TensorBoard's HParams tab
shows one row per fold beside its curves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfold.track import check_folder


class TensorBoardRun:
    """Args:
        logdir: the event folder (``runs/<experiment>/tb/fold<k>``).
        params: the flattened recipe (hparams at the end).
    """

    name = "tensorboard"

    def __init__(self, logdir: Path, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir, self.params = Path(logdir), dict(params)
        check_folder(self.logdir)
        self._writer_type = SummaryWriter
        self.writer: Any = None

    def record(self) -> dict[str, str]:
        return {"logdir": str(self.logdir)}

    def _open(self, first_step: int) -> Any:
        if self.writer is None:
            # purge_step: a resumed fold redoes the steps after its last checkpoint; TensorBoard hides the old ones.
            self.writer = self._writer_type(log_dir=str(self.logdir), purge_step=first_step or None)
        return self.writer

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        writer = self._open(step)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
        writer.flush()  # each row shows at once, not at the writer's two-minute flush

    def finish(self, summary: Mapping[str, float], files: Mapping[str, str], ok: bool) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = self._open(0)
        if ok and summary:
            values = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in self.params.items()}
            for part in hparams(values, dict(summary)):
                writer.file_writer.add_summary(part)
            for tag, value in summary.items():
                writer.add_scalar(tag, value, 0)
        writer.close()
