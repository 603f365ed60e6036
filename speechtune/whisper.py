"""Whisper family: fine-tune Whisper's decoder (and optionally its encoder) with NLL.

The shared loop (optimizer, LR schedule stepped at every optimizer step, freezing, validation,
checkpoints) is ``speechtune.brain.FineTuneBrain``. This module adds the teacher-forced forward,
the NLL loss, greedy (valid) and beam (test) decoding with SpeechBrain's Whisper searchers, and
the family's recipe setup (prefix tokens, text normalisation, pre-flight window/position checks).

Keys read here besides the shared ones: ``whisper`` (``speechtune.whisper_models.Whisper``),
``whisper_hub``, ``language``, ``augmenter`` (``null`` = none), ``speeds``, ``freeze_encoder``,
``whisper_opt_class``, ``whisper_lr_scheduler``, ``label_smoothing``, ``normalize_targets``,
``valid_search``, ``test_search``, ``sample_rate``, ``encoder_cache``.
"""

import json
import os
from pathlib import Path

import speechbrain as sb
import torch
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from speechtune import data
from speechtune.brain import FineTuneBrain
from speechtune.preflight import seq2seq_label_check, speed_length_factors
from speechtune.text import get_normalizer


class WhisperBrain(FineTuneBrain):
    """Whisper encoder-decoder trained by NLL on the decoder's next-token predictions."""

    # one optimizer over every trainable parameter: a frozen encoder has no gradients, so
    # AdamW skips it until ``freeze_encoder_steps`` unfreezes it
    encoder_group = None
    encoder_cache = None  # an ``EncoderCache`` when the yaml asks for one (set by the family)

    @property
    def encoder_frozen(self):
        """``freeze_encoder`` (never trains) or within the first ``freeze_encoder_steps``."""
        return self.hparams.freeze_encoder or super().encoder_frozen

    def parameter_groups(self):
        """One group: the whole model (a ``freeze_encoder`` encoder has no trainable weights)."""
        return {"whisper": self.modules.whisper.parameters()}

    def on_stage_start(self, stage, epoch=None):
        """Valid/test decode after the language token and score with the normaliser of the
        split's language (a test set may be in another language than the run's)."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TRAIN:
            return
        language = self.hparams.language
        if stage == sb.Stage.TEST:
            language = self.split_languages.get(self.test_split, language)
        token = None if language == self.hparams.language else \
            self.tokenizer.convert_tokens_to_ids(f"<|{language}|>")
        for searcher in (self.hparams.valid_search, self.hparams.test_search):
            searcher.set_lang_tokens(token)
        self.score_normalize = self.score_normalizers[language]

    def compute_forward(self, batch, stage):
        """Augment (train) -> log-mel -> encoder (no autograd while frozen) -> decoder on the
        prefix + text tokens -> fp32 log-softmax; greedy (valid) or beam (test) hypotheses."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        bos, bos_lens = batch.tokens_bos
        if stage == sb.Stage.TRAIN and self.hparams.augmenter is not None:
            wavs, wav_lens = self.augment(wavs, wav_lens)
            bos = self.hparams.augmenter.replicate_labels(bos)
            bos_lens = self.hparams.augmenter.replicate_labels(bos_lens)
        # padding positions carry the tokenizer's pad id (the batch pads with 0, a real token)
        lengths = (bos_lens * bos.shape[1]).round()
        pad = ~sb.dataio.dataio.length_to_mask(lengths, bos.shape[1]).bool()
        bos = bos.masked_fill(pad, self.tokenizer.pad_token_id)

        frozen = stage != sb.Stage.TRAIN or self.encoder_frozen
        cached = None
        if self.encoder_cache is not None:
            # the decoder reads the encoder output through linear layers, which autocast casts
            # to its dtype: keeping that dtype loses nothing
            dtype = (torch.get_autocast_dtype(self.device_type)
                     if torch.is_autocast_enabled(self.device_type) else torch.float32)
            cached = self.encoder_cache.get(batch.id, dtype, self.device)
        enc, logits, _ = self.modules.whisper(wavs, bos, encoder_grad=not frozen, encoded=cached)
        if self.encoder_cache is not None and cached is None:
            self.encoder_cache.put(batch.id, enc.detach().to(dtype))
        log_probs = logits.float().log_softmax(dim=-1)
        hyps = None
        if stage == sb.Stage.VALID:
            hyps, _, _, _ = self.hparams.valid_search(enc.detach(), wav_lens)
        elif stage == sb.Stage.TEST:
            hyps, _, _, _ = self.hparams.test_search(enc.detach(), wav_lens)
        return log_probs, hyps

    def compute_objectives(self, predictions, batch, stage):
        """NLL over ``tokens_eos`` (padding masked, optional label smoothing); WER/CER on
        normalised hypotheses and references in valid/test."""
        log_probs, hyps = predictions
        eos, eos_lens = batch.tokens_eos
        if stage == sb.Stage.TRAIN and self.hparams.augmenter is not None:
            eos = self.hparams.augmenter.replicate_labels(eos)
            eos_lens = self.hparams.augmenter.replicate_labels(eos_lens)
        loss = sb.nnet.losses.nll_loss(log_probs, eos, length=eos_lens,
                                       label_smoothing=self.hparams.label_smoothing)
        if stage != sb.Stage.TRAIN:
            texts = self.tokenizer.batch_decode(hyps, skip_special_tokens=True)
            predicted = [self.score_normalize(text).split() for text in texts]
            targets = [words.split() for words in batch.words]
            self.wer_metric.append(batch.id, predicted, targets)
            self.cer_metric.append(batch.id, predicted, targets)
        return loss


class EncoderCache:
    """Outputs of a frozen Whisper encoder by utterance id, so that the encoder no longer runs
    after the first epoch (and, in validation, after the first validation).

    ``where``: ``memory`` (host RAM: about 2.3 MB per utterance for whisper-small in bf16, 3.1 MB
    for medium) or a folder (one file per utterance, written atomically; DDP processes share it).
    A folder records the model it was filled by and refuses another. Only valid while the encoder
    output depends on nothing but the utterance: frozen encoder, no waveform augmentation (the
    family checks both).
    """

    def __init__(self, where, model_id):
        self.memory = {} if where == "memory" else None
        self.folder = None if where == "memory" else Path(where)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = self.folder / "model.json"
            if stamp.exists() and json.loads(stamp.read_text()) != model_id:
                raise ValueError(
                    f"encoder_cache folder {self.folder} holds outputs of "
                    f"{json.loads(stamp.read_text())}, not of {model_id}: delete it or pass "
                    "another --encoder_cache folder.")
            stamp.write_text(json.dumps(model_id))

    def _path(self, utt_id, dtype):
        return self.folder / str(dtype).removeprefix("torch.") / f"{utt_id}.pt"

    def get(self, ids, dtype, device):
        """The batch's cached outputs on ``device``, or None unless every utterance is cached."""
        if self.memory is not None:
            found = [self.memory.get((i, dtype)) for i in ids]
            if any(t is None for t in found):
                return None
        else:  # read nothing unless the whole batch is there (the first epoch fills it)
            paths = [self._path(i, dtype) for i in ids]
            if not all(p.exists() for p in paths):
                return None
            found = [torch.load(p) for p in paths]
        # copy each to the device and stack there: stacking on the host first costs a
        # batch-sized copy in this (the training) process; the whisper-small step on an H100
        # was 3.3x slower that way (tools/benchmark_results/h100, runs 1 and 2)
        return torch.stack([t.to(device, non_blocking=True) for t in found])

    def put(self, ids, encoded):
        """Store each utterance's output (a (frames, dim) tensor, on the CPU)."""
        for utt_id, out in zip(ids, encoded.cpu(), strict=True):
            if self.memory is not None:
                self.memory[(utt_id, out.dtype)] = out.clone()
                continue
            path = self._path(utt_id, out.dtype)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out.clone(), tmp)
            os.replace(tmp, path)  # atomic: a reader never sees half a file


def scoring_normalizer(language, tokenizer):
    """Text normalisation for WER/CER: Whisper's English normaliser for English (with the
    tokenizer's British-to-American spelling map when it has one), the language's registry
    normaliser otherwise (it keeps every letter: æ, ø, å, ß, ...)."""
    if language == "en":
        return EnglishTextNormalizer(getattr(tokenizer, "english_spelling_normalizer", None) or {})
    return get_normalizer(language)


class WhisperFamily:
    """Recipe setup of the Whisper family (used by ``speechtune.recipe.build_experiment``)."""

    brain_class = WhisperBrain
    name = "whisper"

    def __init__(self, hparams):
        self.hparams = hparams
        self.whisper = hparams["whisper"]
        self.tokenizer = self.whisper.tokenizer
        language = hparams["language"]
        if not self.whisper.is_multilingual and language != "en":
            raise ValueError(
                f"language={language}, but {hparams['whisper_hub']} is an English-only Whisper "
                "(no language token). Use a multilingual model, e.g. "
                "--whisper_hub=openai/whisper-small.")
        if self.whisper.is_multilingual and self.whisper.language != language:
            raise ValueError(f"whisper.language={self.whisper.language} but language={language}: "
                             "pass language: !ref <language> to the Whisper wrapper in the yaml.")
        if hparams["freeze_encoder"] and hparams["freeze_encoder_steps"] != 0:
            raise ValueError(
                f"freeze_encoder_steps={hparams['freeze_encoder_steps']} has no effect with "
                "freeze_encoder: True (the encoder never trains). To train it after N steps, "
                "pass --freeze_encoder=False --freeze_encoder_steps=N.")
        self.prefix = list(self.tokenizer.prefix_tokens)
        self._check_decode_lengths()
        self.encoder_cache = self._encoder_cache()
        self.score_normalizers = {}  # by language: every split's (set_texts)

    def _check_decode_lengths(self):
        """Searchers stop after ``encoder frames * max_decode_ratio`` tokens: those must fit the
        decoder's positions after the prefix (else decoding fails deep into a run)."""
        config = self.whisper.model.config
        frames, positions = config.max_source_positions, config.max_target_positions
        for key in ("valid_search", "test_search"):
            ratio = self.hparams[key].max_decode_ratio
            if len(self.prefix) + int(frames * ratio) > positions:
                raise ValueError(
                    f"{key}: max_decode_ratio={ratio} lets it write {int(frames * ratio)} tokens "
                    f"after the {len(self.prefix)}-token prefix, beyond the decoder's {positions} "
                    f"positions; use at most {(positions - len(self.prefix)) / frames:.3f}.")

    def _encoder_cache(self):
        """``encoder_cache``: null (off), ``memory`` or a folder; refused where an utterance's
        encoder output changes between epochs."""
        where = self.hparams["encoder_cache"]
        if where is None:
            return None
        if not self.hparams["freeze_encoder"] or self.hparams["augmenter"] is not None:
            raise ValueError(
                f"encoder_cache={where} needs the same encoder output for an utterance in every "
                "epoch: pass --freeze_encoder=True and --augmenter=null (waveform augmentation "
                "changes the input), or --encoder_cache=null.")
        model_id = {"whisper_hub": str(self.hparams["whisper_hub"]),
                    "window_seconds": self.whisper.window_seconds}
        return EncoderCache(where, model_id)

    def configure(self, brain):
        """Give the Brain what it decodes and scores with (and the encoder cache, if any)."""
        brain.tokenizer = self.tokenizer
        brain.score_normalizers = self.score_normalizers
        brain.score_normalize = self.score_normalizers[self.hparams["language"]]
        brain.encoder_cache = self.encoder_cache

    def inference_settings(self):
        """What an exported model needs besides its weights: language, task and the test
        searcher's settings (``tools/checkpoints.py export``)."""
        search = self.hparams["test_search"]
        settings = {"beam_size": getattr(search, "beam_size", 1)}
        for key in ("min_decode_ratio", "max_decode_ratio", "length_normalization",
                    "using_eos_threshold", "eos_threshold"):
            if hasattr(search, key):
                settings[key] = getattr(search, key)
        # the tokens the searcher never writes, anywhere and as the first token (SpeechBrain's
        # suppress_tokens "-1": Whisper's non-speech symbols and its task/start tokens;
        # suppress_blank: a space or end-of-text first), for transformers' generate
        suppress = {
            "tokens": sorted(int(t) for t in search.get_tokens_to_suppress)
            if search.suppress_tokens else [],
            "begin": self.tokenizer.encode(" ", add_special_tokens=False) + [self.whisper.eos]
            if search.suppress_blank else []}
        return {"language": self.hparams["language"], "task": self.whisper.task,
                "sample_rate": self.hparams["sample_rate"], "test_search": settings,
                "suppress": suppress}

    def save_model_files(self, folder):
        """Whisper's HF config, tokenizer and feature extractor."""
        for part in (self.whisper.model.config, self.tokenizer, self.whisper.feature_extractor):
            part.save_pretrained(folder)

    def set_texts(self, rows, languages):
        """``words``: the scoring reference; ``target``: what the decoder learns to write; each
        normalised for its split's language (``languages``). A split in another language than
        the run's is decoded after that language's token."""
        for split, split_rows in rows.items():
            language = languages[split]
            if language != self.hparams["language"] and not self.whisper.is_multilingual:
                raise ValueError(f"test set {split} is in {language}, but "
                                 f"{self.hparams['whisper_hub']} is an English-only Whisper")
            if language not in self.score_normalizers:
                self.score_normalizers[language] = scoring_normalizer(language, self.tokenizer)
            score, target = self.score_normalizers[language], get_normalizer(language)
            for row in split_rows.values():
                row["words"] = score(row["wrd"])
                row["target"] = target(row["wrd"]) if self.hparams["normalize_targets"] \
                    else row["wrd"]

    def build_tokenizer(self, train_rows):
        """Whisper's own byte-level tokenizer covers every character: no vocabulary check."""
        return None

    def count_tokens(self, text):
        """Decoder positions a target needs: prefix + text tokens (``<|endoftext|>`` is only
        predicted, never fed)."""
        return len(self.prefix) + len(self.tokenizer.encode(text, add_special_tokens=False))

    def label_check(self):
        """Audio within the encoder window (at the most lengthening speed perturbation:
        SpeechBrain's speed 95 makes audio 100/95 as long), targets within the decoder's
        positions."""
        hp = self.hparams
        stretch = 1.0 if hp["augmenter"] is None else speed_length_factors(hp["speeds"])[1]
        return seq2seq_label_check(self.whisper.window_seconds,
                                   self.whisper.model.config.max_target_positions,
                                   self.count_tokens, stretch, self.whisper.model_window_seconds)

    def add_pipelines(self, datasets):
        """``sig``, ``tokens_bos`` (prefix + text) and ``tokens_eos`` (the same shifted by one:
        prefix without start-of-transcript + text + end-of-text)."""
        data.add_audio_pipeline(datasets, self.hparams["sample_rate"])
        tokenizer, prefix, eos = self.tokenizer, self.prefix, self.whisper.eos

        @sb.utils.data_pipeline.takes("target")
        @sb.utils.data_pipeline.provides("tokens_bos", "tokens_eos")
        def text_pipeline(target):
            # position i of the decoder predicts token i + 1: the language and task tokens
            # after <|startoftranscript|>, then the text, then <|endoftext|>
            tokens = prefix + tokenizer.encode(target, add_special_tokens=False) + [eos]
            yield torch.LongTensor(tokens[:-1])
            yield torch.LongTensor(tokens[1:])

        sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
        sb.dataio.dataset.set_output_keys(
            datasets, ["id", "sig", "words", "tokens_bos", "tokens_eos", "duration"])

    def modules(self):
        """The Brain's modules: the Whisper wrapper (encoder and decoder)."""
        return {"whisper": self.whisper}
