"""Surviving preemption and time limits: stop at a batch boundary, checkpoint, exit for requeue.

A cluster asks a job to stop with a signal: SLURM sends SIGTERM when it preempts a job,
submitit has SLURM send SIGUSR2 ``signal_delay_s`` seconds before the time limit, and a
plain ``sbatch --signal=USR1@120`` sends SIGUSR1. :func:`preemptible` catches all three
(around one job) and only *records* the signal; the job stops at the next safe point:

* training: after the current optimizer step (``StopOnPreemption.on_train_batch_end``; after an
  epoch's last step, one step later, so that the epoch's validation is not lost), having
  written ``<run_dir>/train/checkpoints/preempted.ckpt`` (Lightning's own SIGTERM handler is
  replaced by ours while training, so it never stops a job mid-validation);
* expansion: after the current batch is in the store (finished batches are never redone);
* between the pipeline's steps (:meth:`PreemptionFlag.stop_if_requested`).

The job then exits with :data:`EXIT_PREEMPTED`; first, the handler that was installed
before ours runs (under submitit that is its own: it requeues the job and exits), and a job
that SLURM preempts requeues itself (:func:`requeue_if_preempted_by_slurm`). Run again with the
same run dir (a requeued Hydra/submitit job gets the same one), the job reuses the finished
store and resumes training from the newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

#: exit status of a job stopped by a preemption signal after checkpointing (sysexits.h EX_TEMPFAIL:
#: "a temporary failure; the job can be run again"); a wrapper requeues on it
EXIT_PREEMPTED = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
#: name of the mid-epoch checkpoint written when training stops on a signal
PREEMPTED_CHECKPOINT = "preempted.ckpt"


class Preempted(SystemExit):
    """Raised at a safe point after a preemption signal; exits with :data:`EXIT_PREEMPTED` if uncaught."""

    def __init__(self, signum: int):
        super().__init__(EXIT_PREEMPTED)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


class PreemptionFlag:
    """Which preemption signal arrived (if any), and the handlers ours replaced."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            log.warning("job runs outside the main thread: preemption signals cannot be caught here")
            return
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        self.signum = None

    def reclaim(self) -> None:
        """Point the preemption signals back at this flag (while it is installed). Lightning installs
        its own SIGTERM handler when fit/predict starts; it raises at the next batch wherever that is
        -- also right after an epoch's last step or in the middle of validation, a place a resumed
        run cannot make up for -- so while a job is preemptible the stop points are ours alone.
        Lightning restores the handlers it found (ours) when it tears down."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum in self._previous:
                signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # a signal handler only records: the job stops at the next safe point
        if self.signum is None:
            self.signum = signum

    def stop_if_requested(self) -> None:
        """Called at safe points between steps: raises :class:`Preempted` after a signal."""
        if self.signum is not None:
            raise Preempted(self.signum)

    def run_previous_handler(self) -> None:
        """Run the handler ours displaced for the received signal (submitit's requeues the job
        and exits; Python's default SIGTERM action would kill, so defaults are skipped)."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous):
            previous(self.signum, None)


def requeue_if_preempted_by_slurm(signum: int) -> bool:
    """SLURM preemption with a ``GraceTime`` (``PreemptMode=REQUEUE``) sends SIGTERM and waits; a job
    that checkpoints and exits inside the grace time ends FAILED and is not requeued (submitit only
    requeues on SIGUSR2). So after SIGTERM a SLURM job whose record has a ``PreemptTime`` while it is
    still RUNNING requeues itself (``scontrol requeue``); a user's ``scancel``, which also sends
    SIGTERM, leaves the job CANCELLED/COMPLETING and is respected. True if it was requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if signum != signal.SIGTERM or not job or shutil.which("scontrol") is None:
        return False
    if os.environ.get("SLURM_PROCID", "0") != "0":  # one requeue per job: its first task asks (as submitit does)
        return False
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
        record = dict(re.findall(r"(\w+)=(\S*)", shown.stdout))
        if record.get("JobState") != "RUNNING" or record.get("PreemptTime", "None") in ("None", "Unknown", ""):
            return False
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("preempted by SLURM, but asking it to requeue job %s failed: %s", job, exc)
        return False
    if done.returncode != 0:
        log.warning("preempted by SLURM; scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.warning("preempted by SLURM (PreemptTime %s): job %s requeued itself", record["PreemptTime"], job)
    return True


#: the process-wide flag (signal handlers are per process)
PREEMPTION = PreemptionFlag()


@contextmanager
def preemptible(flag: PreemptionFlag = PREEMPTION) -> Iterator[PreemptionFlag]:
    """Record preemption signals during one job; a job stopped by one exits with
    :data:`EXIT_PREEMPTED` once its checkpoint is written."""
    flag.install()
    try:
        yield flag
    except (Preempted, SIGTERMException) as exc:
        if not flag.requested:
            raise  # a SIGTERMException without our signal: not ours to handle
        name = signal.Signals(flag.signum).name
        log.warning(
            "preempted (%s): checkpoint and store are on disk; exiting with %d so the job can be "
            "requeued (the same command and run dir resume it)",
            name,
            EXIT_PREEMPTED,
        )
        requeue_if_preempted_by_slurm(flag.signum)
        flag.run_previous_handler()
        raise SystemExit(EXIT_PREEMPTED) from exc
    finally:
        flag.uninstall()


class StopOnPreemption(Callback):
    """Stops ``fit``/``predict`` at the next batch boundary after a preemption signal.

    With ``checkpoint_path`` set, a stopped ``fit`` first saves a full training checkpoint
    there (weights, optimizer, schedule, loop progress). Under DDP the ranks agree on
    stopping (any rank's signal counts) so they all stop after the same batch.
    """

    def __init__(self, flag: PreemptionFlag = PREEMPTION, checkpoint_path: str | None = None):
        self.flag = flag
        self.checkpoint_path = checkpoint_path

    def _stop_if_requested(self, trainer: L.Trainer) -> None:
        requested = self.flag.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            raise Preempted(self.flag.signum or signal.SIGTERM)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flag.reclaim()  # after Lightning's signal handlers are registered

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flag.reclaim()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # not after an epoch's last batch: a checkpoint from there resumes into the next epoch and
        # that epoch's validation never runs; the stop comes one batch later, after validation
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        self._stop_if_requested(trainer)

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_if_requested(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.checkpoint_path and isinstance(exception, (Preempted, SIGTERMException)) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.checkpoint_path)
            log.info(
                "training stopped at epoch %d, step %d: checkpoint %s",
                trainer.current_epoch,
                trainer.global_step,
                self.checkpoint_path,
            )
