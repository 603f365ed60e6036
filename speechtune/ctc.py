"""CTC family: one Brain for every encoder (WavLM, wav2vec2, HuBERT; Whisper's encoder alone,
``speechtune.whisper_models``) + linear CTC head.

The shared loop (optimizers, LR schedules, freezing, validation, checkpoints) is
``speechtune.brain.FineTuneBrain``; this module adds the CTC forward/loss and the family's recipe
setup (character vocabulary, pre-flight frame check, data pipelines). Keys read here besides the
shared ones: ``encoder``, ``head`` (modules); ``augmenter`` (``null`` = no augmentation);
``encoder_opt_class``, ``head_opt_class``, ``encoder_lr_scheduler``, ``head_lr_scheduler``;
``blank_index``; ``speeds``; ``vocabulary`` and ``target_case`` (below); the decoding keys of
``speechtune.lm``.

``vocabulary: new`` builds a character vocabulary from the normalised training text and a new
linear head. ``vocabulary: pretrained`` keeps a CTC fine-tuned model's own vocabulary and
initialises the head from its CTC head (``facebook/wav2vec2-large-960h``: upper-case letters,
``'`` and ``|`` between words), so fine-tuning starts from a working recogniser.
``target_case`` (``lower`` | ``upper``) maps the normalised text (lower case) to the
vocabulary's case; the pre-flight check stops a run whose text and vocabulary differ in case.
"""

import contextlib
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.utils.distributed import ddp_broadcast, run_on_main

from speechtune import data
from speechtune.brain import FineTuneBrain
from speechtune.lm import GreedyDecoder, build_test_decoder, check_decoding
from speechtune.preflight import ctc_label_check, seq2seq_label_check, speed_length_factors
from speechtune.text import get_normalizer


class CTCBrain(FineTuneBrain):
    """Fine-tune an SSL encoder with a CTC head; WER/CER of greedy CTC decoding in validation and
    of the yaml's ``decoding`` (greedy, beam, beam + n-gram LM) in test."""

    valid_decoder = None  # set by the family's recipe setup
    test_decoder = None  # built when testing starts: an LM is loaded only then

    def parameter_groups(self):
        """The encoder (its trainable part: a frozen CNN is left out) and the head, each with its
        own optimizer and LR."""
        return {"encoder": self.modules.encoder.parameters(),
                "head": self.modules.head.parameters()}

    def on_stage_start(self, stage, epoch=None):
        """Also build the test decoder the yaml's decoding keys ask for, once, when testing."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TEST and self.test_decoder is None:
            self.test_decoder = build_test_decoder(vars(self.hparams), self.tokenizer)

    # ------------------------------------------------------------------ forward / loss
    def compute_forward(self, batch, stage):
        """Augment (train) -> encoder (no autograd while frozen) -> head -> fp32 log-softmax."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        if stage == sb.Stage.TRAIN and self.hparams.augmenter is not None:
            wavs, wav_lens = self.augment(wavs, wav_lens)
        frozen = stage != sb.Stage.TRAIN or self.encoder_frozen
        with torch.no_grad() if frozen else contextlib.nullcontext():
            feats = self.modules.encoder(wavs, wav_lens)
        logits = self.modules.head(feats)
        log_probs = logits.float().log_softmax(dim=-1)
        hyps = None
        if stage != sb.Stage.TRAIN:
            decoder = self.test_decoder if stage == sb.Stage.TEST else self.valid_decoder
            hyps = decoder(log_probs, wav_lens)
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
            targets = [words.split() for words in batch.words]
            self.wer_metric.append(batch.id, hyps, targets)
            self.cer_metric.append(batch.id, hyps, targets)
        return loss


class CTCFamily:
    """Recipe setup of the CTC family (used by ``speechtune.recipe.build_experiment``)."""

    brain_class = CTCBrain
    name = "ctc"

    def __init__(self, hparams):
        self.hparams = hparams
        self.tokenizer = None
        self.pretrained_head = None  # the source model's CTC head (vocabulary: pretrained)
        if hparams["vocabulary"] not in ("new", "pretrained"):
            raise ValueError(f"vocabulary={hparams['vocabulary']!r}: use new or pretrained")
        if hparams["target_case"] not in ("lower", "upper"):
            raise ValueError(f"target_case={hparams['target_case']!r}: use lower or upper")

    def set_texts(self, rows, languages):
        """Targets and references are the same transcript, normalised for the split's language
        (``languages``), in ``target_case``."""
        case = str.upper if self.hparams["target_case"] == "upper" else str.lower
        for split, split_rows in rows.items():
            normalize = get_normalizer(languages[split])
            for row in split_rows.values():
                row["words"] = row["target"] = case(normalize(row["wrd"]))

    def build_tokenizer(self, train_rows):
        """The character vocabulary (``vocabulary``: built from the normalised training text, or
        the pretrained model's own), saved once and reloaded after."""
        path = Path(self.hparams["save_folder"]) / "label_encoder.txt"
        if self.hparams["vocabulary"] == "new":
            kwargs = {"train_texts": [r["words"] for r in train_rows.values()], "path": path}
            run_on_main(data.build_char_vocab, kwargs=kwargs)
            self.tokenizer = data.build_char_vocab(**kwargs)  # loads what the main process saved
        # resumed (the head is checkpointed)? The main process's view decides: it writes the
        # file below, and a process that looked after that would skip the run_on_main barrier
        # the main process waits in (the hang seen with the tiny models)
        elif ddp_broadcast(path.exists() and
                           self.hparams["checkpointer"].find_checkpoint() is not None):
            self.tokenizer = CTCTextEncoder.from_saved(path)
        else:
            labels, blank, delimiter, unk, head = self.hparams["encoder"].pretrained_ctc()
            if blank != self.hparams["blank_index"]:
                raise ValueError(f"{self.hparams['encoder'].source} pads (its CTC blank) with id "
                                 f"{blank}: set blank_index: {blank}")
            self.pretrained_head = head
            kwargs = {"labels": labels, "blank_id": blank, "word_delimiter": delimiter,
                      "unk": unk, "path": path}
            run_on_main(data.pretrained_char_vocab, kwargs=kwargs)
            self.tokenizer = data.pretrained_char_vocab(**kwargs)  # reloads and checks it
        special = {self.tokenizer.blank_label, getattr(self.tokenizer, "unk_label", None)}
        return {c for c in self.tokenizer.lab2ind if c not in special and len(c) == 1}

    def label_check(self):
        """More labels than frames at the fastest speed perturbation (SpeechBrain's speed 105
        shortens audio to 100/105 of its length: the largest speed shortens most). An encoder
        with a fixed input window (``window_seconds``: Whisper's) also needs the audio inside
        it, at the slowest speed, as the Whisper family checks (no decoder: no token limit)."""
        hp, encoder = self.hparams, self.hparams["encoder"]
        shrink, stretch = (1.0, 1.0) if hp["augmenter"] is None else \
            speed_length_factors(hp["speeds"])
        rate = hp["sample_rate"]
        labels = ctc_label_check(lambda s: encoder.output_frames(int(s * rate)), shrink)
        window = getattr(encoder, "window_seconds", None)
        if window is None:  # SSL encoders take any length
            return labels
        fits = seq2seq_label_check(window, float("inf"), len, stretch,
                                   encoder.model_window_seconds)
        return lambda split, row, text: fits(split, row, text) or labels(split, row, text)

    def configure(self, brain):
        """Give the Brain the vocabulary and its validation decoder (greedy: cheap); check the
        test decoding keys now rather than after training."""
        brain.tokenizer = self.tokenizer
        brain.valid_decoder = GreedyDecoder(self.tokenizer, self.hparams["blank_index"])
        check_decoding(self.hparams)

    def inference_settings(self):
        """What an exported model needs besides its weights (``tools/checkpoints.py export``)."""
        hp, encoder = self.hparams, type(self.hparams["encoder"])
        return {"language": hp["language"], "sample_rate": hp["sample_rate"],
                "blank_index": hp["blank_index"], "decoding": hp["decoding"],
                "encoder": f"{encoder.__module__}.{encoder.__qualname__}"}

    def save_model_files(self, folder):
        """The encoder's HF config and feature extractor (the vocabulary is label_encoder.txt)."""
        encoder = self.hparams["encoder"]
        encoder.model.config.save_pretrained(folder)
        encoder.feature_extractor.save_pretrained(folder)

    def add_pipelines(self, datasets):
        """``sig`` and ``tokens`` (character ids of the normalised ``words``)."""
        data.add_audio_pipeline(datasets, self.hparams["sample_rate"])
        tokenizer = self.tokenizer

        @sb.utils.data_pipeline.takes("words")
        @sb.utils.data_pipeline.provides("tokens")
        def text_pipeline(words):
            return torch.LongTensor(tokenizer.encode_sequence(list(words)))

        sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
        sb.dataio.dataset.set_output_keys(datasets, ["id", "sig", "words", "tokens", "duration"])

    def modules(self):
        """The encoder and a linear head sized to the vocabulary: new, or the pretrained CTC
        head's weights (``vocabulary: pretrained``; a resumed run then loads its checkpoint)."""
        encoder = self.hparams["encoder"]
        # the feature size: WavLM's hidden_size; transformers' WhisperConfig maps it to d_model
        head = self.hparams["head"](input_size=encoder.model.config.hidden_size,
                                    n_neurons=len(self.tokenizer.lab2ind))
        if self.pretrained_head is not None:
            head.w.load_state_dict(self.pretrained_head)
        self.hparams["checkpointer"].add_recoverable("head", head)
        return {"encoder": encoder, "head": head}
