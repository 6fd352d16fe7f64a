"""Fold jobs through submitit: local processes (``--launcher local``) or a SLURM job array (``--launcher slurm``).

submitit writes the job scripts, pickles the call, keeps per-job logs in ``runs/<experiment>/jobs/`` and
requeues a checkpointable job on the signal SLURM sends before a time limit or a preemption. What is ours:
the fold job (which re-enters the experiment's command line for one fold, always with ``--resume``), the
choice of GPUs and threads per local job, and the ``job.json`` record each fold folder keeps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfold.config import ConfigError, parse_value
from kfold.rundir import fold_dir, update_job_record

LAUNCHERS = ("none", "local", "slurm")
FOREVER_MIN = 60 * 24 * 365  # submitit's LocalExecutor kills a job after 2 minutes unless told otherwise
SIGNAL_DELAY_S = 120  # SLURM sends USR2 this long before the time limit: time to finish the checkpoint write
# Flags of the launcher itself: a fold job gets the rest of the command line.
_LAUNCHER_FLAGS = {"--launcher": 1, "--jobs": 1, "--partition": 1, "--account": 1, "--gpus-per-fold": 1,
                   "--cpus-per-fold": 1, "--mem-gb": 1, "--time": 1, "--array-parallelism": 1, "--slurm": 1,
                   "--fold": 1, "--retrain": 0}


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fold jobs (submitit)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="none",
                   help="none: in this process (default); local: one process per fold; slurm: a job array")
    g.add_argument("--jobs", type=int, help="local: folds at once (default: one per visible GPU, else 1)")
    g.add_argument("--partition", help="slurm partition")
    g.add_argument("--account", help="slurm account")
    g.add_argument("--gpus-per-fold", type=int, default=1, help="slurm: GPUs per fold (> 1: data-parallel)")
    g.add_argument("--cpus-per-fold", type=int, default=8, help="slurm: CPUs per GPU task")
    g.add_argument("--mem-gb", type=int, help="slurm: memory per fold in GB")
    g.add_argument("--time", default="12:00:00", help="slurm: time limit per job, HH:MM:SS or minutes")
    g.add_argument("--array-parallelism", type=int, default=5, help="slurm: folds running at once")
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other submitit slurm parameter, e.g. --slurm qos=high (repeatable)")


def parse_minutes(text: str) -> int:
    """``--time`` in minutes: ``HH:MM:SS`` (seconds rounded up) or plain minutes."""
    parts = str(text).split(":")
    if len(parts) not in (1, 3) or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--time {text!r}: expected HH:MM:SS or minutes, e.g. 12:00:00 or 720")
    h, m, s = (0, int(parts[0]), 0) if len(parts) == 1 else map(int, parts)
    minutes = h * 60 + m + (s + 59) // 60
    if minutes < 1:
        raise ConfigError(f"--time {text!r}: must be at least one minute")
    return minutes


def check_launcher_args(args: argparse.Namespace) -> None:
    """Refuse bad launcher flags in one line, before anything is submitted."""
    for flag in ("jobs", "gpus_per_fold", "cpus_per_fold", "mem_gb", "array_parallelism"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    parse_minutes(args.time)
    for item in args.slurm:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ConfigError(f"--slurm {item!r}: expected KEY=VALUE, e.g. qos=high")
    if args.launcher == "none" and (args.jobs or args.slurm or args.partition):
        raise ConfigError("--jobs, --partition and --slurm need --launcher local or slurm")


def drop_flags(argv: Sequence[str], flags: Mapping[str, int]) -> list[str]:
    """``argv`` without ``flags`` (flag -> how many values follow it), typed as ``--flag v`` or ``--flag=v``."""
    out, skip = [], 0
    for item in argv:
        if skip:
            skip -= 1
            continue
        flag = item.split("=", 1)[0]
        if flag in flags:
            skip = 0 if "=" in item else flags[flag]
            continue
        out.append(item)
    return out


def job_argv(argv: list[str]) -> list[str]:
    """The command line of a fold job: the user's, without the launcher's own flags."""
    return drop_flags(argv, _LAUNCHER_FLAGS)


def launcher_argv(argv: Sequence[str]) -> list[str]:
    """The launcher's own flags of a command line, as typed (what :func:`job_argv` leaves out, less the folds)."""
    out, keep = [], 0
    for item in argv:
        if keep:
            out.append(item)
            keep -= 1
            continue
        flag = item.split("=", 1)[0]
        if flag in _LAUNCHER_FLAGS and flag not in ("--fold", "--retrain"):
            out.append(item)
            keep = 0 if "=" in item else _LAUNCHER_FLAGS[flag]
    return out


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


@dataclass
class FoldJob:
    """One fold of one experiment, as a submitit job; checkpointable, so a requeued job resumes from last.pt."""

    name: str
    base: dict[str, Any]
    argv: list[str]
    fold: int
    out: str
    threads: int | None = None
    attempts: int = 0

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # data-parallel fold: the same code path as torchrun
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if self.threads:
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            import torch

            torch.set_num_threads(self.threads)
        run_dir = fold_dir(self.out, self.name, self.fold)
        main_task = env.global_rank == 0
        if main_task:
            update_job_record(run_dir, job_id=str(env.job_id), state="running", host=socket.gethostname(),
                              pid=os.getpid(), started=_now(), attempt=self.attempts + 1)
        from kfold.cli import parse_args, run_experiment

        args = parse_args([*self.argv, "--fold", str(self.fold), "--resume"])
        try:
            run_experiment(self.name, self.base, args)
        except KeyboardInterrupt:
            if main_task:  # Ctrl-C or a cancel: not a failure; launching again resumes it
                update_job_record(run_dir, state="cancelled", ended=_now())
            raise
        except Exception as err:  # SystemExit passes through: it is submitit requeueing the job
            if main_task:
                update_job_record(run_dir, state="failed", ended=_now(),
                                  error=" ".join(f"{type(err).__name__}: {err}".split()))
            raise
        if main_task:
            update_job_record(run_dir, state="completed", ended=_now())
        return self.fold

    def checkpoint(self) -> Any:
        """submitit's requeue protocol: the same fold again; ``--resume`` picks it up at its last.pt."""
        import submitit

        update_job_record(fold_dir(self.out, self.name, self.fold), state="requeued", requeued=_now())
        again = FoldJob(self.name, self.base, self.argv, self.fold, self.out, self.threads, self.attempts + 1)
        return submitit.helpers.DelayedSubmission(again)


def visible_gpus() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except ImportError:  # pragma: no cover
        return []


def _record_submission(job: Any, out: str, name: str, fold: int, launcher: str) -> None:
    update_job_record(fold_dir(out, name, fold), job_id=str(job.job_id), launcher=launcher, state="pending",
                      submitted=_now(), stdout=str(job.paths.stdout), stderr=str(job.paths.stderr))


def launch(name: str, base: dict[str, Any], args: argparse.Namespace, folds: list[int], argv: list[str]) -> int:
    """Submit one job per fold in ``folds``; ``local`` waits for them, ``slurm`` returns after submitting."""
    folder = Path(args.out) / name / "jobs"
    if not folds:
        print(f"{name}: every requested fold is complete; nothing to submit")
        return 0
    cmd = job_argv(argv)
    if args.launcher == "local":
        return _run_local(name, base, args, folds, cmd, folder)
    _submit_slurm(name, base, args, folds, cmd, folder)
    return 0


OnDone = Callable[[int, bool], bool]  # (fold, succeeded) -> go on; False cancels the folds not yet finished


def run_folds(name: str, base: dict[str, Any], args: argparse.Namespace, folds: list[int], argv: list[str],
              on_done: OnDone) -> None:
    """Run ``folds`` through ``args.launcher`` and wait for them, calling ``on_done`` as each one ends (the
    search reports each fold to its trial, and stops a pruned trial's other folds).

    ``none`` trains them one after another in this process; ``local`` as local jobs; ``slurm`` as an array,
    polled until every job has ended. Ctrl-C cancels what is running, as for an experiment.
    """
    cmd, folder = job_argv(argv), Path(args.out) / name / "jobs"
    if args.launcher == "none":
        from kfold.cli import parse_args, run_experiment

        for fold in folds:
            try:
                ok = run_experiment(name, base, parse_args([*cmd, "--fold", str(fold), "--resume"])) == 0
            except Exception as err:  # noqa: BLE001 - as a failed job of the other launchers: the caller decides
                print(f"{name} fold {fold}: FAILED: {type(err).__name__}: {' '.join(str(err).split())}",
                      file=sys.stderr)
                ok = False
            if not on_done(fold, ok):
                return
    elif args.launcher == "local":
        code = _run_local(name, base, args, folds, cmd, folder, on_done)
        if code == 130:
            raise KeyboardInterrupt
    else:
        jobs = _submit_slurm(name, base, args, folds, cmd, folder)
        _wait(jobs, on_done)


def _wait(jobs: dict[int, Any], on_done: OnDone, poll_s: float = 5.0) -> None:
    """Poll submitted jobs (submitit asks ``sacct``) until each has ended, in the order they end."""
    running = dict(jobs)
    try:
        while running:
            for fold, job in list(running.items()):
                if job.done():
                    del running[fold]
                    if not on_done(fold, _succeeded(job)):
                        for other in running.values():
                            other.cancel(check=False)
                        return
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for job in running.values():
            job.cancel(check=False)
        raise


def _run_local(name: str, base: dict[str, Any], args: argparse.Namespace, folds: list[int], cmd: list[str],
               folder: Path, on_done: OnDone | None = None) -> int:
    import submitit

    gpus = visible_gpus()
    jobs_at_once = args.jobs or max(1, len(gpus))
    threads = None if gpus else max(1, (os.cpu_count() or 1) // jobs_at_once)
    executor = submitit.LocalExecutor(folder=folder)
    waiting, running, failed = list(folds), {}, []
    free_gpus = list(gpus)
    print(f"{name}: {len(folds)} fold jobs, {jobs_at_once} at once"
          + (", one GPU each" if gpus else f", {threads} CPU thread(s) each") + f"; logs in {folder}")
    try:
        while waiting or running:
            while waiting and len(running) < jobs_at_once:
                fold = waiting.pop(0)
                gpu = free_gpus.pop(0) if gpus else None
                executor.update_parameters(timeout_min=FOREVER_MIN, tasks_per_node=1,
                                           gpus_per_node=1 if gpu is not None else 0,
                                           visible_gpus=[gpu] if gpu is not None else [])
                job = executor.submit(FoldJob(name, base, cmd, fold, args.out, threads))
                _record_submission(job, args.out, name, fold, "local")
                running[fold] = (job, gpu)
                print(f"{name} fold {fold}: started job {job.job_id}" + (f" on GPU {gpu}" if gpu is not None else ""))
            time.sleep(0.5)
            for fold, (job, gpu) in list(running.items()):
                if not job.done():
                    continue
                del running[fold]
                if gpu is not None:
                    free_gpus.append(gpu)
                ok = _succeeded(job)
                if ok:
                    print(f"{name} fold {fold}: done (job {job.job_id})")
                else:
                    failed.append(fold)
                    print(f"{name} fold {fold}: FAILED (job {job.job_id}); log {job.paths.stderr}", file=sys.stderr)
                if on_done is not None and not on_done(fold, ok):
                    for other, _ in running.values():
                        other.cancel(check=False)
                    print(f"{name}: stopped; cancelled {len(running)} running and {len(waiting)} waiting fold job(s)")
                    return 0
    except KeyboardInterrupt:
        for job, _ in running.values():
            job.cancel(check=False)
        print(f"interrupted: cancelled {len(running)} running fold job(s); finished folds are kept. Run the same "
              f"command again to finish (unfinished folds resume from last.pt)", file=sys.stderr)
        return 130
    if failed and on_done is None:
        print(f"error: {name}: fold(s) {', '.join(map(str, failed))} failed; see python -m kfold.status "
              f"--out {args.out} {name}", file=sys.stderr)
        return 1
    return 0


def _succeeded(job: Any) -> bool:
    from submitit.core.utils import UncompletedJobError

    try:
        return job.exception() is None
    except UncompletedJobError:  # killed before it could write its result
        return False


def slurm_parameters(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters from the command line (``--slurm`` last: it may override any)."""
    gpus = args.gpus_per_fold
    params: dict[str, Any] = {"job_name": name, "time": parse_minutes(args.time), "nodes": 1, "gpus_per_node": gpus,
                              "ntasks_per_node": gpus, "cpus_per_task": args.cpus_per_fold,
                              "array_parallelism": args.array_parallelism, "signal_delay_s": SIGNAL_DELAY_S}
    for key, value in (("partition", args.partition), ("account", args.account),
                       ("mem", f"{args.mem_gb}GB" if args.mem_gb else None)):
        if value:
            params[key] = value
    for item in args.slurm:
        key, value = item.split("=", 1)
        params[key.strip().replace("-", "_")] = parse_value(value)
    return params


def _submit_slurm(name: str, base: dict[str, Any], args: argparse.Namespace, folds: list[int], cmd: list[str],
                  folder: Path) -> dict[int, Any]:
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=20)
    try:
        executor.update_parameters(**slurm_parameters(args, name))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--slurm: {' '.join(str(err).split())}") from None
    threads = args.cpus_per_fold
    jobs = executor.submit_array([FoldJob(name, base, cmd, fold, args.out, threads) for fold in folds])
    for fold, job in zip(folds, jobs):
        _record_submission(job, args.out, name, fold, "slurm")
        print(f"{name} fold {fold}: submitted job {job.job_id}")
    print(f"{name}: {len(jobs)} fold jobs in array {jobs[0].job_id.split('_')[0]}; "
          f"watch with: python -m kfold.status --out {args.out} {name} --watch 60")
    return dict(zip(folds, jobs))
