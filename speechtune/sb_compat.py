"""Where speechtune depends on SpeechBrain internals, gathered in one place.

``BrainCompat`` holds every override of a private ``speechbrain.Brain`` member; it turns each into
a public hook that ``speechtune.brain.FineTuneBrain`` implements. ``PRIVATE_MEMBERS`` lists the
private attributes of other SpeechBrain classes that speechtune reads or overrides (the Whisper
wrapper's feature settings, the Checkpointer's meta-file writer). All were checked against the
SpeechBrain versions ``SPEECHBRAIN_CHECKED``; the unit test of this module fails on an installed
SpeechBrain outside that range or one that lacks any of them: re-check each on an upgrade.
"""

import speechbrain as sb
from speechbrain.decoders.seq2seq import S2SWhisperBeamSearcher
from speechbrain.integrations.huggingface.whisper import Whisper
from speechbrain.utils.checkpoints import Checkpointer

SPEECHBRAIN_CHECKED = ">=1.1.2,<1.2"

#: class -> private attributes read or overridden elsewhere in speechtune (where, and why)
PRIVATE_MEMBERS = {
    sb.Brain: ("_fit_valid", "_should_save_intra_epoch_ckpt",
               "_optimizer_step_limit_exceeded"),  # here
    # speechtune.whisper_models: the window and log-mel settings; loading the encoder alone
    Whisper: ("_n_samples", "_hop_length", "_n_fft", "_mel_filters", "_from_pretrained"),
    # speechtune.checkpoints.AtomicCheckpointer: the meta file written under another name
    Checkpointer: ("_save_checkpoint_metafile",),
    # speechtune.whisper_models.WhisperBeamSearcher: the cache reordering after each step
    S2SWhisperBeamSearcher: ("_reorder_cache",),
}


class BrainCompat(sb.Brain):
    """``sb.Brain`` with its private members' overrides turned into public hooks."""

    def intra_epoch_checkpoint_allowed(self):
        """Whether SpeechBrain's timed/step checkpoint may be saved now (default: yes)."""
        return True

    def skip_epoch_end_validation(self):
        """Whether to skip the validation at this epoch's end (default: no)."""
        return False

    @property
    def step_limit_reached(self):
        """``optimizer_step_limit`` reached: training ends after this step."""
        return self._optimizer_step_limit_exceeded

    def before_intra_epoch_checkpoint(self):
        """Called right before SpeechBrain's timed/step checkpoint is saved (default: nothing)."""

    def _should_save_intra_epoch_ckpt(self, last_ckpt_time, steps_since_ckpt):
        if not self.intra_epoch_checkpoint_allowed():
            return False
        save = super()._should_save_intra_epoch_ckpt(last_ckpt_time, steps_since_ckpt)
        if save:
            self.before_intra_epoch_checkpoint()
        return save

    def _fit_valid(self, valid_set, epoch, enable):
        if self.skip_epoch_end_validation():
            return None
        return super()._fit_valid(valid_set, epoch, enable)
