"""The training step without host syncs: ``DeviceStep``, the base of ``FineTuneBrain``.

SpeechBrain's step reads the loss on the host three times per batch: ``fit_batch`` returns
``loss.cpu()``, and ``check_loss_isfinite`` and ``update_average`` branch on ``torch.isfinite``.
On a GPU each read waits for all the step's kernels, so the host cannot queue the next batch
while the GPU runs this one. Here nothing in the step reads the device:

- the running average of the training loss is SpeechBrain's recurrence, kept in float64 on the
  device: the numbers shown and logged are SpeechBrain's, bit for bit;
- whether a batch's loss is finite is a flag on the device. An update that a non-finite batch
  joined is skipped on the device: a fused optimizer (``fused_adamw: True``, the default) takes
  the flag as GradScaler's ``found_inf`` and leaves parameters, moments and its step count
  alone. Any other optimizer makes the host read the flag once per update. fp16's GradScaler
  skips such updates itself, as before. A skipped update still counts as an optimizer step (the
  LR schedule moves on), as fp16's skips always did;
- the host reads the average and the flags together (``read_train_state``), only where
  something keeps them: every ``log_every_steps`` updates (the curves), before a validation,
  before a checkpoint and at the epoch's end. Each non-finite batch is then named in the log and
  counted against ``nonfinite_patience`` (under DDP, every process's batches); too many stop the
  run there, at most ``log_every_steps`` updates after the batch, with its utterance IDs;
- the progress bar shows the average through a copy that waits for nothing (``LaggedRead``): on
  a GPU it is a step or two behind.

Training batches are copied to a GPU from pinned memory without blocking the host.
"""

import logging

import speechbrain as sb
import torch
from speechbrain.utils.distributed import ddp_all_reduce

from speechtune.sb_compat import BrainCompat

logger = logging.getLogger(__name__)


def running_average(average, loss, step):
    """SpeechBrain's ``Brain.update_average`` on the device: the running mean over ``step``
    batches, unchanged by a non-finite loss. ``average`` is a float64 tensor (float32 on Apple's
    MPS, which has no float64)."""
    updated = average - average / step + loss.detach().to(average.dtype) / step
    return torch.where(torch.isfinite(loss.detach()), updated, average)


class DeviceStep(BrainCompat):
    """``sb.Brain``'s training step with the loss and the non-finite check kept on the device;
    the host reads both in ``read_train_state``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reset_train_state()

    def _reset_train_state(self):
        """No device average yet (the first update starts it from ``avg_train_loss``: 0, or a
        resumed run's), no unread batches, no loss returned."""
        self._loss_average, self._unread, self._update_flag = None, [], None
        self._read_due, self._returned_loss, self._shown = False, None, LaggedRead()

    def on_stage_start(self, stage, epoch=None):
        """A training stage starts a fresh device average."""
        if stage == sb.Stage.TRAIN:
            self._reset_train_state()

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """SpeechBrain's loader; on a GPU its batches come in pinned memory (``compute_forward``
        copies them without blocking the host)."""
        loader_kwargs.setdefault("pin_memory", self.device_type == "cuda")
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def fit_batch(self, batch):
        """SpeechBrain's training step, returning the loss on its device. Out of GPU memory, the
        error names the batch: its utterances and their seconds, and the keys that make batches
        smaller."""
        should_step = self.step % self.grad_accumulation_factor == 0
        self.on_fit_batch_start(batch, should_step)
        try:
            with self.no_sync(not should_step):
                with self.training_ctx:
                    outputs = self.compute_forward(batch, sb.Stage.TRAIN)
                    loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
                scaled_loss = self.scaler.scale(loss / self.grad_accumulation_factor)
                self.check_loss_isfinite(scaled_loss)
                scaled_loss.backward()
            if should_step:
                self.optimizers_step()
        except torch.OutOfMemoryError as err:
            raise out_of_memory(batch, err) from err
        self.on_fit_batch_end(batch, outputs, loss, should_step)
        self._returned_loss = loss.detach()  # what SpeechBrain hands to update_average next
        return self._returned_loss

    def on_fit_batch_start(self, batch, should_step):
        """Remember the batch's utterances (named if its loss is not finite)."""
        self._batch_ids = list(batch.id)

    def check_loss_isfinite(self, loss):
        """Flag a non-finite loss on the device: the update it joins is skipped
        (``optimizers_step``); ``read_train_state`` names the batch later."""
        bad = ~torch.isfinite(loss.detach())
        self._update_flag = bad if self._update_flag is None else self._update_flag | bad
        self._unread.append((self._batch_ids, bad))

    def optimizers_step(self):
        """SpeechBrain's update, skipped when a batch accumulated into it had a non-finite loss
        (under DDP: on every process if on one)."""
        bad, self._update_flag = self._update_flag, None
        if bad is None or self.scaler.is_enabled():  # fp16: GradScaler skips non-finite grads
            return super().optimizers_step()
        if self.distributed_launch:
            bad = ddp_all_reduce(bad.float(), torch.distributed.ReduceOp.MAX).bool()
        optimizers = list(self.freeze_optimizers(self.optimizers_dict).values())
        if not all(getattr(opt, "_step_supports_amp_scaling", False) for opt in optimizers):
            if bool(bad):  # the one host read of an update by an unfused optimizer
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                self.optimizer_step += 1
                return None
            return super().optimizers_step()
        found_inf = bad.float()
        for opt in optimizers:
            opt.found_inf = found_inf  # read by fused optimizers, as GradScaler passes it
        try:
            return super().optimizers_step()
        finally:
            for opt in optimizers:
                del opt.found_inf

    def update_average(self, loss, avg_loss):
        """Training: update the device average and return the host's copy
        (``avg_train_loss``), refreshed only when a read is due. Validation and testing (a loss
        ``fit_batch`` did not return): SpeechBrain's average on the host."""
        if loss is not self._returned_loss:
            return super().update_average(loss, avg_loss)
        self._returned_loss = None
        if self._loss_average is None:
            dtype = torch.float32 if loss.device.type == "mps" else torch.float64
            self._loss_average = torch.tensor(float(avg_loss), dtype=dtype, device=loss.device)
        self._loss_average = running_average(self._loss_average, loss, self.step)
        if self._read_due:
            self._read_due = False
            return self.read_train_state()
        shown = self._shown.push(self._loss_average)  # the progress bar's, without a wait
        return avg_loss if shown is None else shown

    def read_train_state(self):
        """The host read: set and return ``avg_train_loss`` from the device average; name every
        batch since the last read whose loss was not finite, and stop the run when this epoch
        has had more than ``nonfinite_patience`` of them."""
        unread, self._unread = self._unread, []
        flags = torch.stack([bad for _, bad in unread]).tolist() if unread else []
        bad = [ids for (ids, _), flag in zip(unread, flags, strict=True) if flag]
        for ids in bad:
            self.nonfinite_batch(ids)
        self.count_nonfinite(len(bad), bad[-1] if bad else None)
        if self._loss_average is not None:
            self.avg_train_loss = float(self._loss_average)
        return self.avg_train_loss

    def nonfinite_batch(self, batch_ids):
        """Name a batch whose loss was not finite (its update was skipped) in the log."""
        logger.warning("non-finite training loss on batch [%s]: its optimizer update was skipped "
                       "(nonfinite_patience: %d per epoch)", _listed(batch_ids),
                       self.nonfinite_patience)

    def count_nonfinite(self, new, last_ids):
        """Add ``new`` non-finite batches to the epoch's count; past ``nonfinite_patience`` stop
        the run, naming ``last_ids``. Under DDP the count is every process's: each reads at the
        same step (a log step, a validation, a checkpoint, the epoch's end), so all stop together
        rather than one raising while the others wait in their next collective."""
        if self.distributed_launch:
            new = int(ddp_all_reduce(torch.tensor(new, device=self.device),
                                     torch.distributed.ReduceOp.SUM))
        self.nonfinite_count += new
        if self.nonfinite_count <= self.nonfinite_patience:
            return
        where = (f"the last on this process held [{_listed(last_ids)}]" if last_ids else
                 "this process's batches were finite: the log of the others names theirs")
        raise ValueError(
            f"{self.nonfinite_count} training batches of epoch {self.current_epoch} had a "
            f"non-finite loss (more than nonfinite_patience={self.nonfinite_patience}); {where}. "
            "Check those utterances (audio with NaN samples, transcripts that do not match), "
            "lower the LR or max_grad_norm, or raise nonfinite_patience. The checkpoints saved "
            "so far are intact: rerunning the command resumes.")

    def read_due(self):
        """Read the training state on the host after this batch's average is in (a log step)."""
        self._read_due = True

    def before_intra_epoch_checkpoint(self):
        """The checkpoint holds ``avg_train_loss``: read it first."""
        self.read_train_state()


class LaggedRead:
    """The latest value of a device scalar that has reached the host without a wait: ``push``
    starts a copy (pinned, non-blocking on a GPU) when the previous one has landed (its CUDA
    event has completed) and returns the newest landed value (None before the first)."""

    def __init__(self):
        self.value, self._copy, self._landed = None, None, None

    def push(self, scalar):
        if self._copy is not None and self._landed.query():
            self.value, self._copy = float(self._copy), None  # landed: reading it waits for nothing
        if self._copy is None:
            copy = scalar.detach().to("cpu", non_blocking=True)
            if not scalar.is_cuda:  # already on the host
                self.value = float(copy)
            else:
                self._copy, self._landed = copy, torch.cuda.Event()
                self._landed.record()
        return self.value


def _listed(batch_ids, most=8):
    return ", ".join(batch_ids[:most]) + (" ..." if len(batch_ids) > most else "")


def out_of_memory(batch, err):
    """The out-of-memory error of a training batch, naming its utterances, their seconds and the
    keys that make batches smaller."""
    seconds = sorted(((float(d), i) for d, i in zip(batch.duration, batch.id, strict=True)),
                     reverse=True)
    listed = ", ".join(f"{i} ({d:.1f} s)" for d, i in seconds[:5])
    return torch.OutOfMemoryError(
        f"Out of GPU memory on a training batch of {len(seconds)} utterances, "
        f"{sum(d for d, _ in seconds):.1f} s of audio, the longest {listed}. Lower "
        "max_batch_seconds (duration-budget batches) or batch_size, lower max_duration "
        "(drops long training utterances), or train with grad_accumulation_factor to "
        "keep the effective batch. The checkpoints saved so far are intact: rerunning "
        f"the command resumes.\n({err})")
