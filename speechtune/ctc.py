"""CTCBrain: one Brain for every SSL encoder (WavLM, wav2vec2, HuBERT) + linear CTC head.

What the yaml must declare (keys read here; a missing key is an error, never a silent default):
``encoder``, ``head`` (modules); ``augmenter`` (``null`` = no augmentation); ``encoder_opt_class``,
``head_opt_class``; ``encoder_lr_scheduler``, ``head_lr_scheduler`` (Noam or tri-stage, stepped at
every optimizer step); ``freeze_encoder_steps`` (int or ``always``); ``blank_index``;
``valid_every_steps`` (0 = only at epoch end); ``log_every_steps``; ``num_to_keep``;
``train_logger``, ``wer_computer``, ``cer_computer``, ``checkpointer``, ``history``.
"""

import contextlib
import logging

import speechbrain as sb
import torch
from speechbrain.nnet.schedulers import TriStageLRSchedule

from speechtune.outputs import write_curves

logger = logging.getLogger(__name__)


class CTCBrain(sb.Brain):
    """Fine-tune an SSL encoder with a CTC head; greedy CTC decoding for WER/CER."""

    tokenizer = None  # speechbrain CTCTextEncoder, set by the recipe runner
    valid_loader = None

    # ------------------------------------------------------------------ freezing
    @property
    def encoder_frozen(self):
        """True while the transformer encoder is frozen (``freeze_encoder_steps``)."""
        steps = self.hparams.freeze_encoder_steps
        return steps == "always" or self.optimizer_step < int(steps)

    def freeze_optimizers(self, optimizers):
        """Step only the head optimizer while the encoder is frozen."""
        if self.encoder_frozen:
            return {"head": optimizers["head"]}
        return optimizers

    def init_optimizers(self):
        """An optimizer for the encoder (its trainable part: a frozen CNN is left out) and one
        for the head, each with its own LR."""
        enc_params = [p for p in self.modules.encoder.parameters() if p.requires_grad]
        self.optimizers_dict = {
            "encoder": self.hparams.encoder_opt_class(enc_params),
            "head": self.hparams.head_opt_class(self.modules.head.parameters()),
        }
        if self.checkpointer is not None:
            for name, opt in self.optimizers_dict.items():
                self.checkpointer.add_recoverable(f"{name}_opt", opt)
        self._step_schedulers()  # the first optimizer step already uses the warmup LR

    def _step_schedulers(self):
        """Set each optimizer's LR for the upcoming optimizer step."""
        for name in ("encoder", "head"):
            scheduler = getattr(self.hparams, f"{name}_lr_scheduler")
            opt = self.optimizers_dict[name]
            if isinstance(scheduler, TriStageLRSchedule):
                scheduler(opt, self.optimizer_step)
            else:  # Noam-style: counts its own steps (checkpointed); keep it at optimizer_step + 1
                while scheduler.n_steps < self.optimizer_step + 1:
                    scheduler(opt)

    def current_lrs(self):
        """Current LR of each optimizer."""
        return {f"lr_{n}": o.param_groups[0]["lr"] for n, o in self.optimizers_dict.items()}

    # ------------------------------------------------------------------ forward / loss
    def compute_forward(self, batch, stage):
        """Augment (train) -> encoder (no autograd while frozen) -> head -> fp32 log-softmax."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        if stage == sb.Stage.TRAIN and self.hparams.augmenter is not None:
            wavs, wav_lens = self.hparams.augmenter(wavs, wav_lens)
        frozen = stage != sb.Stage.TRAIN or self.encoder_frozen
        with torch.no_grad() if frozen else contextlib.nullcontext():
            feats = self.modules.encoder(wavs, wav_lens)
        logits = self.modules.head(feats)
        log_probs = logits.float().log_softmax(dim=-1)
        hyps = None
        if stage != sb.Stage.TRAIN:
            hyps = sb.decoders.ctc_greedy_decode(log_probs, wav_lens,
                                                 blank_id=self.hparams.blank_index)
        return log_probs, wav_lens, hyps

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss in fp32 outside autocast; WER/CER in valid/test."""
        log_probs, wav_lens, hyps = predictions
        tokens, token_lens = batch.tokens
        if stage == sb.Stage.TRAIN and self.hparams.augmenter is not None:
            tokens = self.hparams.augmenter.replicate_labels(tokens)
            token_lens = self.hparams.augmenter.replicate_labels(token_lens)
        with torch.autocast(device_type=self.device_type, enabled=False):
            loss = sb.nnet.losses.ctc_loss(log_probs.float(), tokens, wav_lens, token_lens,
                                           self.hparams.blank_index)
        if stage != sb.Stage.TRAIN:
            predicted = ["".join(chars).split() for chars in self.tokenizer.decode_ndim(hyps)]
            targets = [words.split() for words in batch.words]
            self.wer_metric.append(batch.id, predicted, targets)
            self.cer_metric.append(batch.id, predicted, targets)
        return loss

    # ------------------------------------------------------------------ hooks
    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """After an optimizer step: schedule LRs, log the loss curve, validate every N steps."""
        if not should_step:
            return
        self._step_schedulers()
        step = self.optimizer_step
        if step % self.hparams.log_every_steps == 0:
            self.hparams.history.add_train(step, float(loss.detach()))
        every = self.hparams.valid_every_steps
        if every and step % every == 0 and self.valid_loader is not None:
            self._validate(end_of_epoch=False)
            self.modules.train()

    def _validate(self, end_of_epoch):
        """Run the validation loop now (used for step-based validation inside an epoch)."""
        self.on_stage_start(sb.Stage.VALID, self.current_epoch)
        self.modules.eval()
        avg = 0.0
        for i, batch in enumerate(self.valid_loader, start=1):
            loss = self.evaluate_batch(batch, sb.Stage.VALID)
            avg += (float(loss) - avg) / i
        self._end_valid(avg, end_of_epoch)

    def on_stage_start(self, stage, epoch=None):
        """Fresh WER/CER accumulators for valid/test."""
        if stage == sb.Stage.TRAIN:
            self.current_epoch = epoch
            self.train_stats = None
        else:
            self.wer_metric = self.hparams.wer_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log stats; checkpoint on validation (best WER + latest kept); write test alignments."""
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
        elif stage == sb.Stage.VALID:
            self._end_valid(stage_loss, end_of_epoch=True)
        else:
            stats = self._error_stats(stage_loss)
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current,
                            "split": self.test_split}, test_stats=stats)
            path = f"{self.hparams.output_folder}/wer_{self.test_split}.txt"
            with open(path, "w", encoding="utf-8") as f:
                self.wer_metric.write_stats(f)
            self.test_stats = stats
            logger.info("%s WER %.2f%%  CER %.2f%%  (alignments: %s)", self.test_split,
                        stats["WER"], stats["CER"], path)

    def _error_stats(self, loss):
        return {"loss": loss, "WER": self.wer_metric.summarize("error_rate"),
                "CER": self.cer_metric.summarize("error_rate")}

    def _end_valid(self, loss, end_of_epoch):
        stats = self._error_stats(loss)
        step = self.optimizer_step
        meta = {"epoch": self.current_epoch, "step": step, **self.current_lrs()}
        # mid-epoch: the running average of this epoch so far, not the previous epoch's loss
        train_stats = self.train_stats if end_of_epoch else {"loss": float(self.avg_train_loss)}
        self.hparams.train_logger.log_stats(
            stats_meta=meta, train_stats=train_stats, valid_stats=stats)
        self.hparams.history.add_valid(step, stats["WER"], stats["CER"])
        self.checkpointer.save_and_keep_only(
            meta={"WER": stats["WER"], "CER": stats["CER"], "epoch": self.current_epoch,
                  "step": step},
            min_keys=["WER"], num_to_keep=self.hparams.num_to_keep, end_of_epoch=end_of_epoch)
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

    def evaluate(self, test_set, split="test", **kwargs):
        """``Brain.evaluate`` on the best-WER checkpoint; alignments go to ``wer_<split>.txt``."""
        self.test_split = split
        kwargs.setdefault("min_key", "WER")
        super().evaluate(test_set, **kwargs)
        return self.test_stats
