"""FineTuneBrain: the training loop every model family shares (CTC, Whisper).

A family's Brain adds ``compute_forward``/``compute_objectives`` and says which parameters each
optimizer trains (``parameter_groups``); the rest is here, once:

- one optimizer and one LR schedule per parameter group, declared in yaml as
  ``optim: {<group>: {optimizer: ..., scheduler: ...}}`` (Noam or tri-stage), the LR set
  *before* every optimizer step (SpeechBrain's own Whisper recipes declare a scheduler and never
  step it);
- what a checkpoint holds, listed in one place (``checkpoint_contents``);
- staged encoder freezing: ``freeze_encoder_steps`` (0, N or ``always``); while frozen the encoder
  runs without autograd and its optimizer (if it has one) is not stepped;
- validation at epoch ends and every ``valid_every_steps`` optimizer steps, each followed by a
  checkpoint that keeps the best WER and the latest ``num_to_keep``;
- training by epochs or up to ``optimizer_step_limit`` optimizer steps, whichever comes first;
- the loss/WER history (checkpointed) and ``curves.png``; per test utterance ``wer_<split>.txt``
  and ``hyps_<split>.tsv``;
- testing the best-WER checkpoint, or the average of the ``average_best`` best ones, or the best
  that kept the retain sets (``speechtune.retain``); per-group WER/CER with bootstrap intervals
  (``speechtune.metrics``) when the manifests have group columns.

The step itself (no host syncs; a batch with a non-finite loss skipped, named and counted) is
``speechtune.step.DeviceStep``.

Keys read here (a missing key is an error, never a silent default): ``optim``,
``freeze_encoder_steps``, ``valid_every_steps``, ``log_every_steps``, ``num_to_keep``,
``average_best``, ``train_logger``, ``group_bootstrap_resamples``, ``seed``, ``wer_computer``,
``cer_computer``, ``checkpointer``, ``history``, ``epoch_counter``, ``output_folder``.
SpeechBrain's private members are overridden in ``speechtune.sb_compat`` only.
"""

import logging
import math

import speechbrain as sb
import torch
from speechbrain.augment.time_domain import SpeedPerturb
from speechbrain.nnet.schedulers import TriStageLRSchedule
from speechbrain.utils.checkpoints import average_checkpoints

from speechtune import adapters, metrics
from speechtune.checkpoints import RNGState
from speechtune.outputs import report_groups, write_curves
from speechtune.step import DeviceStep

logger = logging.getLogger(__name__)


class FineTuneBrain(DeviceStep):
    """Per-group optimizers and LR schedules, staged freezing, best-WER checkpoints, curves."""

    tokenizer = None  # set by the family's recipe setup
    averaged_from = None  # names of the checkpoints whose average the modules hold (testing)
    groups = None  # {split: {utterance id: {group column: value}}} for per-group test metrics
    valid_loader = None
    zero_shot = False  # True while ``evaluate(..., zero_shot=True)`` runs
    split_languages = {}  # {split: language}, set by the recipe runner
    scoring_split = "valid"  # the split being decoded (valid, a test or a retain set)
    retain = None  # a ``speechtune.retain.RetainGuard`` when the yaml names retain sets
    #: the optimizer group that trains the encoder, skipped while it is frozen (None: the
    #: family has one optimizer; a frozen encoder then simply has no gradients)
    encoder_group = "encoder"

    def __init__(self, modules=None, hparams=None, run_opts=None, checkpointer=None):
        super().__init__(modules=modules, hparams=hparams, run_opts=run_opts,
                         checkpointer=checkpointer)
        self._own_modules = dict(modules or {})  # as given: not the DDP wrappers made later
        self.optimizers_dict = {}
        self._register_checkpoint()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_contents(self):
        """Everything a checkpoint holds, by its file name in the checkpoint folder:

        - each module (``modules()`` of the family: ``encoder`` + ``head``, or ``whisper``): its
          whole state, or for a module with LoRA adapters only what trains in it
          (``speechtune.adapters.save_trainable``: the frozen weights are the source model's);
        - ``<group>_lr_scheduler`` and, once training starts, ``<group>_opt`` per ``optim``
          group;
        - ``counter`` (epochs done), ``history`` (loss/WER curves), ``rng`` (the random
          generators: a resumed run draws what the uninterrupted one would have; optional, as
          checkpoints of older runs lack it);
        - and SpeechBrain's own: ``brain`` (step counters), ``scaler`` (fp16 only),
          ``dataloader-TRAIN`` (mid-epoch position).

        Returns ``{name: (object, optional_load)}`` for speechtune's part."""
        contents = {name: (module, False) for name, module in self._own_modules.items()}
        for name, group in self.hparams.optim.items():
            contents[f"{name}_lr_scheduler"] = (group["scheduler"], False)
        contents.update({f"{name}_opt": (opt, False)
                         for name, opt in self.optimizers_dict.items()})
        contents.update(counter=(self.hparams.epoch_counter, False),
                        history=(self.hparams.history, False), rng=(RNGState(), True))
        return contents

    def _register_checkpoint(self):
        """Register what ``checkpoint_contents`` lists and is not registered yet."""
        if self.checkpointer is None:
            return
        for name, (obj, optional) in self.checkpoint_contents().items():
            if name in self.checkpointer.recoverables:
                continue
            hooks = {}
            if isinstance(obj, torch.nn.Module) and adapters.is_adapted(obj):
                hooks = {"custom_save_hook": adapters.save_trainable,
                         "custom_load_hook": adapters.load_trainable}
            self.checkpointer.add_recoverable(name, obj, optional_load=optional, **hooks)

    # ------------------------------------------------------------------ to override
    def parameter_groups(self):
        """``{group name: trainable parameters}``; each group gets its own optimizer and LR."""
        raise NotImplementedError

    # ------------------------------------------------------------------ freezing
    @property
    def encoder_frozen(self):
        """True while the encoder is frozen (``freeze_encoder_steps``: 0, N or ``always``)."""
        steps = self.hparams.freeze_encoder_steps
        return steps == "always" or self.optimizer_step < int(steps)

    def freeze_optimizers(self, optimizers):
        """Do not step the encoder's optimizer while the encoder is frozen."""
        if self.encoder_frozen and self.encoder_group in optimizers:
            return {k: v for k, v in optimizers.items() if k != self.encoder_group}
        return optimizers

    # ------------------------------------------------------------------ optimizers and LRs
    def init_optimizers(self):
        """One optimizer per parameter group (``optim[<group>][optimizer]``), checkpointed as
        ``<group>_opt``; a group without trainable parameters gets none."""
        groups, optim = self.parameter_groups(), self.hparams.optim
        if set(groups) != set(optim):
            raise ValueError(f"optim declares the groups {sorted(optim)}, but this family trains "
                             f"{sorted(groups)}: give optim one entry per group, each with an "
                             "optimizer and a scheduler")
        self.optimizers_dict = {}
        for name, params in groups.items():
            params = [p for p in params if p.requires_grad]
            if params:
                self.optimizers_dict[name] = optim[name]["optimizer"](params)
        if not self.optimizers_dict:
            raise ValueError("Nothing to train: every parameter is frozen.")
        self._register_checkpoint()
        self._step_schedulers()  # the first optimizer step already uses the warmup LR

    def on_fit_start(self):
        """SpeechBrain's start (optimizers, then the checkpoint), then check that a tri-stage LR
        schedule ends where training does (``optimizer_step_limit``)."""
        super().on_fit_start()
        limit = self.optimizer_step_limit
        for name in self.optimizers_dict if limit else ():
            scheduler = self.hparams.optim[name]["scheduler"]
            if not isinstance(scheduler, TriStageLRSchedule):
                continue
            span = scheduler.warmup_steps + scheduler.hold_steps + scheduler.decay_steps
            if abs(span - limit) >= 1:
                raise ValueError(
                    f"optim.{name}.scheduler warms up, holds and decays over {span:g} optimizer "
                    f"steps, but training stops at optimizer_step_limit={limit}: the LR would "
                    f"{'stop before its decay' if limit < span else 'sit at its floor'}. Set the "
                    "length with --total_steps=N (the schedule and the limit follow it); a "
                    "resumed run keeps the schedule it started with (its checkpoint).")

    def _step_schedulers(self):
        """Set each optimizer's LR for the upcoming optimizer step."""
        for name, opt in self.optimizers_dict.items():
            scheduler = self.hparams.optim[name]["scheduler"]
            if isinstance(scheduler, TriStageLRSchedule):
                scheduler(opt, self.optimizer_step)
            else:  # Noam-style: counts its own steps (checkpointed); keep it at optimizer_step + 1
                while scheduler.n_steps < self.optimizer_step + 1:
                    scheduler(opt)

    def current_lrs(self):
        """Current LR of each optimizer."""
        return {f"lr_{n}": o.param_groups[0]["lr"] for n, o in self.optimizers_dict.items()}

    def intra_epoch_checkpoint_allowed(self):
        """SpeechBrain's ``ckpt_interval_minutes`` / ``ckpt_interval_steps`` checkpoints, only
        right after an update: between accumulated batches the gradients so far are not in a
        checkpoint, and a resumed run would lose them."""
        return self.step % self.grad_accumulation_factor == 0

    # ------------------------------------------------------------------ augmentation
    def augment(self, wavs, wav_lens):
        """Waveform augmentation (``augmenter``) in fp32 outside autocast, on the run's device.

        SpeechBrain's ``SpeedPerturb`` resamples on the CPU unless told otherwise (a host round
        trip per batch), and under CUDA bf16 autocast a batch that went through ``DropFreq``
        first reaches it as bf16 and fails against its fp32 kernel.
        """
        augmenter = self.hparams.augmenter
        for aug in augmenter.augmentations.values():
            if isinstance(aug, SpeedPerturb):
                aug.device = self.device
        with torch.autocast(device_type=self.device_type, enabled=False):
            return augmenter(wavs.float(), wav_lens)

    # ------------------------------------------------------------------ hooks
    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """After an optimizer step: schedule LRs, log the loss curve, validate every N steps."""
        if not should_step:
            return
        step = self.optimizer_step
        self._step_schedulers()
        if step % self.hparams.log_every_steps == 0:  # a host read, and one of all the flags
            self.read_due()
            shown = float(loss.detach())
            if math.isfinite(shown):  # a skipped (non-finite) batch leaves no point
                self.hparams.history.add_train(step, shown, self.current_lrs())
        every = self.hparams.valid_every_steps
        if every and step % every == 0 and self.valid_loader is not None:
            self._validate(end_of_epoch=False)
            self.modules.train()

    def _validate(self, end_of_epoch):
        """Run the validation loop now (used for step-based validation inside an epoch)."""
        self.read_train_state()  # the train loss logged beside it, and the checkpoint's
        self._end_valid(self.score_loader(self.valid_loader, self.current_epoch), end_of_epoch)

    def score_loader(self, loader, epoch=None):
        """Decode ``loader`` as validation does (modules in eval mode, greedy): fresh WER/CER
        accumulators hold its scores; returns its mean loss. Leaves the modules in eval mode."""
        self.on_stage_start(sb.Stage.VALID, epoch)
        self.modules.eval()
        avg = 0.0
        for i, batch in enumerate(loader, start=1):
            loss = self.evaluate_batch(batch, sb.Stage.VALID)
            avg += (float(loss) - avg) / i
        return avg

    def on_stage_start(self, stage, epoch=None):
        """Fresh WER/CER accumulators for valid/test."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TRAIN:
            self.current_epoch = epoch
            self.train_stats = None
        else:
            self.wer_metric = self.hparams.wer_computer()
            self.cer_metric = self.hparams.cer_computer()
            self.hypotheses = {}  # {id: (raw reference, raw hypothesis)}, by the family

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log stats; checkpoint on validation (best WER + latest kept); write test alignments."""
        if stage == sb.Stage.TRAIN:  # SpeechBrain passes the last value the host read
            self.train_stats = {"loss": self.read_train_state()}
        elif stage == sb.Stage.VALID:
            self._end_valid(stage_loss, end_of_epoch=True)
        else:
            stats = self._error_stats(stage_loss)
            meta = {"Epoch loaded": self.hparams.epoch_counter.current, "split": self.test_name}
            if self.zero_shot:
                meta = {"split": self.test_name, "weights": "as loaded, before training"}
            elif self.averaged_from:
                meta["averaged"] = " + ".join(self.averaged_from)
            self.hparams.train_logger.log_stats(stats_meta=meta, test_stats=stats)
            path = f"{self.hparams.output_folder}/wer_{self.test_name}.txt"
            if sb.utils.distributed.if_main_process():  # under DDP every process tested it all
                metrics.write_test_files(self)  # wer_<split>.txt, hyps_<split>.tsv
            self.test_stats = stats
            if self.groups and self.groups.get(self.test_split) and \
                    sb.utils.distributed.if_main_process():
                stem = f"{self.hparams.output_folder}/wer_{self.test_name}_groups"
                text = report_groups(self.wer_metric.scores, self.cer_metric.scores,
                                     self.groups[self.test_split], self.test_name, stem,
                                     int(self.hparams.group_bootstrap_resamples),
                                     self.hparams.seed)
                logger.info("per-group results (%s.md):\n%s", stem, text)
            logger.info("%s WER %.2f%%  CER %.2f%%  (alignments: %s)", self.test_name,
                        stats["WER"], stats["CER"], path)

    def _error_stats(self, loss):
        return {"loss": loss, "WER": self.wer_metric.summarize("error_rate"),
                "CER": self.cer_metric.summarize("error_rate")}

    def _end_valid(self, loss, end_of_epoch):
        stats = self._error_stats(loss)
        step = self.optimizer_step
        meta = {"epoch": self.current_epoch, "step": step, **self.current_lrs()}
        kept = {"WER": stats["WER"], "CER": stats["CER"], "epoch": self.current_epoch,
                "step": step}
        keys = [] if self.retain is None else self.retain.on_validation(self, stats, kept)
        # mid-epoch: the running average of this epoch so far, not the previous epoch's loss
        train_stats = self.train_stats if end_of_epoch else {"loss": float(self.avg_train_loss)}
        self.hparams.train_logger.log_stats(
            stats_meta=meta, train_stats=train_stats, valid_stats=stats)
        self.hparams.history.add_valid(step, stats["WER"], stats["CER"])
        self.checkpointer.save_and_keep_only(
            meta=kept, min_keys=["WER"], importance_keys=keys,
            num_to_keep=self.hparams.num_to_keep, end_of_epoch=end_of_epoch)
        if sb.utils.distributed.if_main_process():
            write_curves(self.hparams.history, f"{self.hparams.output_folder}/curves.png")

    # ------------------------------------------------------------------ entry points
    def fit(self, epoch_counter, train_set, valid_set=None, **kwargs):
        """``Brain.fit``, keeping the valid loader for step-based validation."""
        if valid_set is not None and not isinstance(valid_set, torch.utils.data.DataLoader):
            # ckpt_prefix=None: a mid-epoch checkpoint must not record the valid loader as spent
            valid_set = self.make_dataloader(valid_set, stage=sb.Stage.VALID, ckpt_prefix=None,
                                             **kwargs.get("valid_loader_kwargs", {}))
        self.valid_loader = valid_set
        batch_sampler = kwargs.get("train_loader_kwargs", {}).get("batch_sampler")
        if batch_sampler is not None:
            # SpeechBrain calls train_sampler.set_epoch(epoch) (a new shuffle each epoch) but only
            # registers samplers itself under DDP; DDP wraps this one in make_dataloader
            self.train_sampler = batch_sampler
        return super().fit(epoch_counter, train_set, valid_set, **kwargs)

    def skip_epoch_end_validation(self):
        """Skip it when ``optimizer_step_limit`` ended training right after a step-based
        validation (the same weights again) or on a rerun of a finished run."""
        done = self.hparams.history.valid
        return bool(self.step_limit_reached and done and done[-1][0] == self.optimizer_step)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Load the best checkpoint by ``min_key`` (WER); with ``average_best: N`` > 1, then
        replace every module's weights by their average over the N best (SpeechBrain's
        ``average_checkpoints``); the rest (counters, schedulers) stays the best one's. A
        zero-shot test loads nothing: it scores the weights as loaded."""
        if self.zero_shot:
            return
        n = int(self.hparams.average_best)
        if self.retain is not None and self.retain.max_rise is not None:
            return self.retain.recover(self, min_key)
        if n <= 1:
            self.averaged_from = None
            return super().on_evaluate_start(max_key=max_key, min_key=min_key)
        found = self.checkpointer.find_checkpoints(min_key=min_key, max_num_checkpoints=n)
        if len(found) < n:
            raise ValueError(
                f"average_best={n} but {self.checkpointer.checkpoints_dir} keeps {len(found)} "
                f"checkpoint(s) with a {min_key}: train with num_to_keep >= {n} (it keeps the "
                f"N best), or average fewer.")
        if self.averaged_from == [c.path.name for c in found]:
            return  # another split: the modules already hold this average (no re-reading)
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        for name, module in self._own_modules.items():
            adapters.load_weights(module, average_checkpoints(found, name))
        self.averaged_from = [c.path.name for c in found]
        logger.info("testing the average of the %d best checkpoints by %s: %s", n, min_key,
                    ", ".join(self.averaged_from))

    def evaluate(self, test_set, split="test", zero_shot=False, **kwargs):
        """``Brain.evaluate`` on the best-WER checkpoint; alignments go to ``wer_<split>.txt``.

        ``zero_shot``: score the modules as they are (the pretrained weights, before ``fit``
        recovers or trains anything); alignments go to ``wer_<split>_zero_shot.txt``."""
        self.test_split = self.scoring_split = split
        self.zero_shot = zero_shot
        self.test_name = f"{split}_zero_shot" if zero_shot else split
        kwargs.setdefault("min_key", "WER")
        try:
            super().evaluate(test_set, **kwargs)
        finally:
            self.zero_shot, self.scoring_split = False, "valid"
        return self.test_stats
