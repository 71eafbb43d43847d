"""What a training shows while it runs, on rank 0: progress lines, TensorBoard scalars, Weights & Biases.

Progress lines go to ``print_fn`` (the console of a local run; the job's stdout, so its log, on SLURM; each
line flushed) at a steady pace: after the first and the last iteration of an epoch, and in between every
``PRINT_INTERVAL_S`` seconds or every ``train.print_freq`` iterations, whichever comes first::

    epoch 3/50 [120/3697]  loss 12.3456 (mean 13.0012)  lr 2.00e-04  2.31 it/s  eta 0:25:48  run 17:02:11

Epochs count from 0 as everywhere else (``log.jsonl``, checkpoints, the stop and resume messages, the
official code): ``epoch 3/50`` is the fourth of 50, three being done, as ``--status`` says ``3/50``; the
iterations are those done. ``it/s`` is the pace since the previous line; the epoch's ETA is its mean pace so
far, the run's adds the epochs after it and their evaluations (at the mean time evaluations took so far).
After each evaluation, the AP line (``epoch 3/50  AP 31.2  AP50 50.1 ... APl –``; ``–``: no value, such as APl
on a split without large objects); at the end, the run's final AP.

TensorBoard (``<run folder>/tensorboard/``, as detectron2 and detrex write it): ``train/<loss term>`` (means
over the iterations since the previous point), ``lr/<parameter group>`` and ``train/iters_per_s`` every
``train.print_freq`` iterations and at the end of an epoch; per epoch ``epoch/train_<loss term>`` and
``epoch/time_s``, and after its evaluation ``val/AP``, ``val/AP50``, ... and ``epoch/eval_time_s``. The x
axis is the iteration (``epoch * iterations per epoch + iterations done``) for every scalar, so a resumed run
carries on its curves: the writer purges whatever an interrupted attempt wrote after the resumed iteration.

Weights & Biases: with ``train.wandb`` on and ``wandb`` installed, the same scalars go to a W&B run named
after the run folder (project ``$WANDB_PROJECT``, default ``deformable-detr-tables``), resumed under the id
kept in ``<run folder>/wandb_id``. ``wandb`` is imported only then; not installed, a one-line warning says so
and the training goes on. Neither tracker can fail a training: an error in one turns it off with a warning.
"""

from __future__ import annotations

import datetime
import math
import os
import time
import uuid
from typing import Callable, Dict, Optional

PRINT_INTERVAL_S = 20.0  # a progress line at least this often (and at least every train.print_freq iterations)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
NO_VALUE = "–"
WANDB_PROJECT = "deformable-detr-tables"


def duration(seconds: float) -> str:
    """``0:25:48``; ``1 day, 2:03:04`` past a day."""
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def metric_text(value) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return NO_VALUE
    return f"{value:.1f}"


def ap_text(metrics: dict) -> str:
    """``AP 31.2  AP50 50.1  AP75 32.0  APs 14.3  APm 34.0  APl –`` (the metrics present; None as ``–``)."""
    return "  ".join(f"{k} {metric_text(metrics.get(k))}" for k in METRICS if k in metrics)


class Tracker:
    """Progress lines, TensorBoard and W&B of one training, on the main rank (elsewhere every call does nothing).

    ``first_step``: the iterations done (in :meth:`global_step`'s count) when this attempt starts; TensorBoard
    drops what an earlier attempt wrote after that. ``evaluates(epoch)``: whether an epoch ends with an
    evaluation (for the run's ETA)."""

    def __init__(
        self,
        output_dir: Optional[str],
        train_cfg,
        iters_per_epoch: int,
        main: bool = True,
        print_fn: Optional[Callable[[str], None]] = print,
        first_step: int = 0,
        evaluates: Callable[[int], bool] = lambda epoch: True,
        config: Optional[dict] = None,
        tensorboard: bool = True,
    ):
        self.epochs, self.print_freq = train_cfg.epochs, max(1, train_cfg.print_freq)
        self.iters_per_epoch, self.evaluates = max(1, iters_per_epoch), evaluates
        self.main, self.print_fn = main, print_fn if main else None
        self.eval_times = []
        self.writer = self.wandb = None
        if main and output_dir is not None and tensorboard:
            # the points after first_step (iterations done) are this attempt's to write
            self.writer = _tensorboard(os.path.join(output_dir, "tensorboard"), first_step + 1, self._warn)
        if main and output_dir is not None and train_cfg.wandb:
            self.wandb = _wandb(output_dir, config, self._warn)

    # ---------------------------------------------------------------------------------------- epoch
    def begin_epoch(self, epoch: int, n_iters: int, skip: int = 0) -> None:
        self.epoch, self.n_iters, self.skip = epoch, n_iters, skip
        self.start = self.last_print = time.time()
        self.last_print_it = self.last_write_it = skip
        self.last_write = self.start
        self.window: Dict[str, float] = {}

    def iteration(self, it: int, values: Dict[str, float], sums: Dict[str, float], lrs: Dict[str, float]) -> None:
        """After iteration ``it`` (from 0) of the epoch: ``values`` its losses, ``sums`` the epoch's so far."""
        if not self.main:
            return
        for k, v in values.items():
            self.window[k] = self.window.get(k, 0.0) + v
        done, last = it + 1, it == self.n_iters - 1
        now = time.time()
        if self.writer is not None or self.wandb is not None:
            if done % self.print_freq == 0 or last:
                n = done - self.last_write_it
                rate = n / max(now - self.last_write, 1e-9)
                scalars = {f"train/{k}": v / n for k, v in self.window.items()}
                scalars.update({f"lr/{k[3:] if k.startswith('lr_') else k}": v for k, v in lrs.items()})
                scalars["train/iters_per_s"] = rate
                self._scalars(scalars, self.global_step(self.epoch, done))
                self.window, self.last_write_it, self.last_write = {}, done, now
        if self.print_fn is None:
            return
        if not (
            it == self.skip
            or last
            or done - self.last_print_it >= self.print_freq
            or now - self.last_print >= PRINT_INTERVAL_S
        ):
            return
        rate = (done - self.last_print_it) / max(now - self.last_print, 1e-9)
        per_it = (now - self.start) / max(done - self.skip, 1)
        eta = per_it * (self.n_iters - done)
        later = range(self.epoch + 1, self.epochs)
        mean_eval = sum(self.eval_times) / len(self.eval_times) if self.eval_times else 0.0
        run_eta = (
            eta
            + per_it * self.iters_per_epoch * len(later)
            + mean_eval * sum(1 for e in range(self.epoch, self.epochs) if self.evaluates(e))
        )
        lr = next(iter(lrs.values()), float("nan"))
        self.print_fn(
            f"epoch {self.epoch}/{self.epochs} [{done}/{self.n_iters}]  loss {values['loss']:.4f} "
            f"(mean {sums['loss'] / done:.4f})  lr {lr:.2e}  {rate:.2f} it/s  eta {duration(eta)}  "
            f"run {duration(run_eta)}"
        )
        self.last_print, self.last_print_it = now, done

    def epoch_done(self, record: dict) -> None:
        """An epoch's record (losses, time, and its evaluation's metrics when it had one), as ``log.jsonl``
        gets it."""
        if not self.main:
            return
        epoch = record["epoch"]
        evaluated = any(k in record for k in METRICS)
        if "eval_time_s" in record:
            self.eval_times.append(record["eval_time_s"])
        if self.print_fn is not None:
            # the weighted loss and the final layer's terms (the auxiliary layers' _0, _1, ... are in log.jsonl)
            losses = ", ".join(
                f"{k[6:]} {v:.4f}"
                for k, v in record.items()
                if k.startswith("train_loss") and not k.rpartition("_")[2].isdigit()
            )
            self.print_fn(f"epoch {epoch}/{self.epochs} done in {duration(record.get('epoch_time_s', 0))}: {losses}")
            if evaluated:
                self.print_fn(
                    f"epoch {epoch}/{self.epochs}  {ap_text(record)}  "
                    f"(evaluated in {duration(record.get('eval_time_s', 0))})"
                )
        scalars = {f"epoch/{k}": v for k, v in record.items() if k.startswith("train_") and isinstance(v, float)}
        scalars.update({f"val/{k}": record[k] for k in METRICS if isinstance(record.get(k), (int, float))})
        for key, name in (("epoch_time_s", "epoch/time_s"), ("eval_time_s", "epoch/eval_time_s")):
            if isinstance(record.get(key), (int, float)):
                scalars[name] = record[key]
        self._scalars(scalars, self.global_step(epoch + 1, 0))

    def final(self, metrics: dict) -> None:
        if self.print_fn is not None and any(k in metrics for k in METRICS):
            self.print_fn(f"final  {ap_text(metrics)}")

    # ------------------------------------------------------------------------------------- writers
    def global_step(self, epoch: int, iterations_done: int) -> int:
        return epoch * self.iters_per_epoch + iterations_done

    def _scalars(self, scalars: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            try:
                for k, v in scalars.items():
                    self.writer.add_scalar(k, v, step)
            except Exception as err:  # noqa: BLE001 - a tracker never fails a training
                self._warn(f"TensorBoard off: {type(err).__name__}: {err}")
                self.writer = None
        if self.wandb is not None:
            try:
                self.wandb.log(scalars, step=step)
            except Exception as err:  # noqa: BLE001
                self._warn(f"Weights & Biases off: {type(err).__name__}: {err}")
                self.wandb = None

    def _warn(self, text: str) -> None:
        print(f"WARNING: {text}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
            self.writer = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass
            self.wandb = None


def _tensorboard(log_dir: str, first_step: int, warn):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=log_dir, purge_step=first_step, flush_secs=30)
    except Exception as err:  # noqa: BLE001 - tensorboard missing or broken: the training goes on
        warn(f"no TensorBoard scalars ({type(err).__name__}: {err}); pip install tensorboard")
        return None


def _wandb(output_dir: str, config: Optional[dict], warn):
    try:
        import wandb
    except ImportError:
        warn("train.wandb is on but wandb is not installed (pip install wandb): not logging to Weights & Biases")
        return None
    id_file = os.path.join(output_dir, "wandb_id")
    try:
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            os.makedirs(output_dir, exist_ok=True)
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
            name=os.path.basename(os.path.normpath(output_dir)),
            id=run_id,
            resume="allow",
            dir=output_dir,
            config=config,
        )
        return wandb
    except Exception as err:  # noqa: BLE001 - not logged in, offline, ...: the training goes on
        warn(f"Weights & Biases off: {type(err).__name__}: {err}")
        return None
