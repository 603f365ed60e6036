"""Whisper family: fine-tune Whisper's decoder (and optionally its encoder) with NLL.

The shared loop (optimizer, LR schedule stepped at every optimizer step, freezing, validation,
checkpoints) is ``speechtune.brain.FineTuneBrain``. This module adds the teacher-forced forward,
the NLL loss, greedy (valid) and beam (test) decoding with SpeechBrain's Whisper searchers, and
the family's recipe setup (prefix tokens, text normalisation, pre-flight window/position checks).

Keys read here besides the shared ones (``hparams/whisper.yaml`` declares them all): ``model``
(the source), ``whisper`` (``speechtune.whisper_models.Whisper``, built with that source),
``window_seconds``, ``language``, ``augmenter`` (``null`` = none), ``speeds``,
``freeze_encoder``, ``optim`` group ``whisper``, ``label_smoothing``, ``normalize_targets``,
``valid_search`` and ``test_search`` (SpeechBrain searchers, built on the model),
``sample_rate``, ``encoder_cache``; ``lora``, ``lora_*`` and ``gradient_checkpointing``
(``speechtune.adapters``). The export is ``speechtune.whisper_export``.
"""

import inspect
from pathlib import Path

import speechbrain as sb
import torch
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from speechtune import adapters, data, packaged, tiny, whisper_models
from speechtune.brain import FineTuneBrain
from speechtune.encoder_cache import EncoderCache
from speechtune.family import Family
from speechtune.preflight import seq2seq_label_check, speed_length_factors
from speechtune.text import get_normalizer
from speechtune.whisper_export import export_whisper


class WhisperBrain(FineTuneBrain):
    """Whisper encoder-decoder trained by NLL on the decoder's next-token predictions."""

    # one optimizer over every trainable parameter: a frozen encoder has no gradients, so
    # AdamW skips it until ``freeze_encoder_steps`` unfreezes it
    encoder_group = None
    encoder_cache = None  # an ``EncoderCache`` when the yaml asks for one (set by the family)
    valid_search = test_search = None  # the searchers, set by the family

    @property
    def encoder_frozen(self):
        """``freeze_encoder`` (never trains) or within the first ``freeze_encoder_steps``."""
        return self.hparams.freeze_encoder or super().encoder_frozen

    def parameter_groups(self):
        """One group: the whole model (a ``freeze_encoder`` encoder has no trainable weights)."""
        return {"whisper": self.modules.whisper.parameters()}

    def on_stage_start(self, stage, epoch=None):
        """Valid/test decode after the language token and score with the normaliser of the
        split's language (a test or retain set may be in another language than the run's)."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TRAIN:
            return
        language = self.split_languages.get(self.scoring_split, self.hparams.language)
        token = None if language == self.hparams.language else \
            self.tokenizer.convert_tokens_to_ids(f"<|{language}|>")
        for searcher in (self.valid_search, self.test_search):
            searcher.set_lang_tokens(token)
        self.score_normalize = self.score_normalizers[language]

    def compute_forward(self, batch, stage):
        """Augment (train) -> log-mel -> encoder (no autograd while frozen) -> decoder on the
        prefix + text tokens -> fp32 log-softmax; greedy (valid) or beam (test) hypotheses."""
        batch = batch.to(self.device, non_blocking=True)  # pinned on a GPU: no host wait
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
        if stage == sb.Stage.VALID:  # each utterance after its own prefix's language token
            hyps = whisper_models.prefix_search(self.valid_search, enc.detach(), wav_lens, bos)
        elif stage == sb.Stage.TEST:
            hyps, _, _, _ = self.test_search(enc.detach(), wav_lens)
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
            predicted = whisper_models.prefix_normalized(self, texts, batch.tokens_bos[0])
            targets = [words.split() for words in batch.words]
            self.wer_metric.append(batch.id, predicted, targets)
            self.cer_metric.append(batch.id, predicted, targets)
            self.hypotheses.update(zip(batch.id, zip(batch.wrd, texts, strict=True), strict=True))
        return loss


def scoring_normalizer(language, tokenizer):
    """Text normalisation for WER/CER: Whisper's English normaliser for English (with the
    tokenizer's British-to-American spelling map when it has one), the language's registry
    normaliser otherwise (it keeps every letter: æ, ø, å, ß, ...)."""
    if language == "en":
        return EnglishTextNormalizer(getattr(tokenizer, "english_spelling_normalizer", None) or {})
    return get_normalizer(language)


class WhisperFamily(Family):
    """The Whisper family: encoder-decoder, decoder trained by NLL (``speechtune.family`` for the
    order of the steps)."""

    name = "whisper"
    brain_class = WhisperBrain
    inference_class = "WhisperASR"
    processor_class = "WhisperProcessor"
    summary = "a Whisper encoder-decoder, NLL"
    language_use = "text normaliser (speechtune.text registry) and Whisper language token"
    lora_parts = {"decoder": ("decoder.layers",), "encoder": ("encoder.layers",),
                  "both": ("encoder.layers", "decoder.layers")}

    def __init__(self, hparams):
        super().__init__(hparams)
        if hparams["freeze_encoder"] and hparams["freeze_encoder_steps"] != 0:
            raise ValueError(
                f"freeze_encoder_steps={hparams['freeze_encoder_steps']} has no effect with "
                "freeze_encoder: True (the encoder never trains). To train it after N steps, "
                "pass --freeze_encoder=False --freeze_encoder_steps=N.")
        self._check_lora()
        self.whisper = self.tokenizer = self.prefix = self.encoder_cache = self.lora = None
        self.searchers = {}
        self.score_normalizers = {}  # by language: every row's (set_texts)

    def _check_lora(self):
        """LoRA on the encoder makes it trainable; LoRA on the decoder alone keeps it frozen."""
        hp = self.hparams
        lora, frozen, cache = hp["lora"], hp["freeze_encoder"], hp["encoder_cache"]
        if lora in ("encoder", "both") and (frozen or cache is not None):
            raise ValueError(
                f"lora={lora} puts trainable adapters in the encoder, so it is no longer frozen "
                "and its output changes at every step (nothing for an encoder cache to keep): "
                "pass --freeze_encoder=False --encoder_cache=null, or --lora=decoder.")
        if lora == "decoder" and not frozen:
            raise ValueError(
                "lora=decoder trains adapters in the decoder and leaves every encoder weight as "
                "loaded, but freeze_encoder: False asks to train the encoder: pass "
                "--freeze_encoder=True, or --lora=both (adapters in the encoder too).")

    def build_model(self, train_texts):
        """The ``whisper`` wrapper on the ``model`` source (a ``tiny:`` preset built first, its
        BPE trained on the normalised training text), and the searchers on it; then the checks
        that need the model: language, decoding lengths, encoder cache."""
        hp = self.hparams
        language = hp["language"]
        normalize = get_normalizer(language)
        self.source = source = tiny.resolve_source(
            hp["model"], Path(hp["output_folder"]) / "tiny_model", "encoder-decoder",
            texts=[normalize(t) for t in train_texts], window_seconds=hp["window_seconds"],
            config=hp["tiny_config"])
        self.whisper = hp["whisper"](source=source)
        self.lora = adapters.adapt(self.whisper, hp, self.lora_parts, base={
            "source": str(source), "window_seconds": self.whisper.window_seconds})
        if source != str(hp["model"]):
            self.whisper.source = str(hp["model"])
        self.tokenizer = self.whisper.tokenizer
        if not self.whisper.is_multilingual and language != "en":
            raise ValueError(
                f"language={language}, but {hp['model']} is an English-only Whisper "
                "(no language token). Use a multilingual model, e.g. "
                "--model=openai/whisper-small.")
        if self.whisper.is_multilingual and self.whisper.language != language:
            raise ValueError(f"whisper.language={self.whisper.language} but language={language}: "
                             "pass language: !ref <language> to the Whisper wrapper in the yaml.")
        # SpeechBrain's greedy searcher takes the model, its beam searcher a one-module list
        self.searchers = {
            key: hp[key](module=[self.whisper]) if "module" in inspect.signature(hp[key]).parameters
            else hp[key](model=self.whisper) for key in ("valid_search", "test_search")}
        self.prefix = list(self.tokenizer.prefix_tokens)
        self._check_decode_lengths()
        self.encoder_cache = self._encoder_cache()

    def _check_decode_lengths(self):
        """Searchers stop after ``encoder frames * max_decode_ratio`` tokens: those must fit the
        decoder's positions after the prefix (else decoding fails deep into a run)."""
        config = self.whisper.model.config
        frames, positions = config.max_source_positions, config.max_target_positions
        for key, searcher in self.searchers.items():
            ratio = searcher.max_decode_ratio
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
        model_id = {"whisper_hub": str(self.source),
                    "window_seconds": self.whisper.window_seconds}
        return EncoderCache(where, model_id)

    def configure(self, brain):
        """Give the Brain what it decodes and scores with (and the encoder cache, if any)."""
        brain.tokenizer = self.tokenizer
        brain.score_normalizers = self.score_normalizers
        brain.score_normalize = self.score_normalizers[self.hparams["language"]]
        brain.encoder_cache = self.encoder_cache
        brain.valid_search = self.searchers["valid_search"]
        brain.test_search = self.searchers["test_search"]

    def inference_settings(self):
        """What an exported model needs besides its weights: language, task and the test
        searcher's settings (``tools/checkpoints.py export``)."""
        search = self.searchers["test_search"]
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
                "suppress": suppress, "lora": self.lora}

    def save_model_files(self, folder):
        """Whisper's HF config, tokenizer and feature extractor."""
        for part in (self.whisper.model.config, self.tokenizer, self.whisper.feature_extractor):
            part.save_pretrained(folder)

    def set_texts(self, rows, languages):
        """``words``: the scoring reference; ``target``: what the decoder learns to write; each
        normalised for its split's language (``languages``). A split in another language than
        the run's is decoded after that language's token."""
        for split, split_rows in rows.items():
            for row in split_rows.values():
                language = row["utt_language"] = row.get("utt_language") or languages[split]
                if language != self.hparams["language"] and not self.whisper.is_multilingual:
                    raise ValueError(f"{split} holds {language} speech ({row['ID']}), but "
                                     f"{self.hparams['model']} is an English-only Whisper")
                if language not in self.score_normalizers:
                    self.score_normalizers[language] = scoring_normalizer(language,
                                                                          self.tokenizer)
                row["words"] = self.score_normalizers[language](row["wrd"])
                row["target"] = get_normalizer(language)(row["wrd"]) \
                    if self.hparams["normalize_targets"] else row["wrd"]

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
        prefix without start-of-transcript + text + end-of-text); the prefix carries each
        utterance's own language token (``utt_language``: replay, retain, test sets)."""
        data.add_audio_pipeline(datasets, self.hparams["sample_rate"])
        tokenizer, eos = self.tokenizer, self.whisper.eos
        prefixes = {language: self.prefix_for(language) for language in self.score_normalizers}

        @sb.utils.data_pipeline.takes("target", "utt_language")
        @sb.utils.data_pipeline.provides("tokens_bos", "tokens_eos")
        def text_pipeline(target, language):
            # position i of the decoder predicts token i + 1: the language and task tokens
            # after <|startoftranscript|>, then the text, then <|endoftext|>
            tokens = prefixes[language] + tokenizer.encode(target, add_special_tokens=False) + \
                [eos]
            yield torch.LongTensor(tokens[:-1])
            yield torch.LongTensor(tokens[1:])

        sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
        sb.dataio.dataset.set_output_keys(
            datasets, ["id", "sig", "wrd", "words", "tokens_bos", "tokens_eos", "duration"])

    def prefix_for(self, language):
        """The decoder prefix with ``language``'s token (a test, retain or replay utterance in
        another language than the run's); the run's own prefix for its language."""
        if language == self.hparams["language"]:
            return self.prefix
        token = self.tokenizer.convert_tokens_to_ids(f"<|{language}|>")
        own = self.tokenizer.convert_tokens_to_ids(f"<|{self.hparams['language']}|>")
        return [token if t == own else t for t in self.prefix]

    def modules(self):
        """The Brain's modules: the Whisper wrapper (encoder and decoder)."""
        return {"whisper": self.whisper}

    def window_seconds(self):
        return self.whisper.window_seconds

    @classmethod
    def export(cls, save, ckpts, info, out):
        """``speechtune.whisper_export.export_whisper``."""
        return export_whisper(save, ckpts, info, out)

    @classmethod
    def check_language(cls, language):
        """Whisper must have a language token for it."""
        if language not in LANGUAGES:
            raise ValueError(f"Whisper has no language token for '{language}'; Whisper recipes "
                             f"need one of: {', '.join(sorted(LANGUAGES))}")

    def setup_summary(self):
        """The decoder's prefix tokens."""
        tokens = self.tokenizer.convert_ids_to_tokens(self.tokenizer.prefix_tokens)
        return f"Whisper prefix: {''.join(tokens)}"

    # ------------------------------------------------------------------ tools/benchmark.py
    benchmark_variants = ("hf", "recipe", "cache")

    @classmethod
    def build_random_model(cls, folder, config, texts):
        """A random-init Whisper of ``config``, its BPE (2000 tokens) trained on ``texts``."""
        config = {k: v for k, v in config.items() if k != "model_type"}
        return tiny.build_tiny_whisper(folder, texts, bpe_vocab_size=2000, **config)

    @classmethod
    def benchmark_overrides(cls, batch_seconds=None, batch_size=None, real_model=False):
        """The family's part of the benchmark's yaml overrides: the LibriSpeech recipes' frozen
        encoder (and so the encoder cache's setting), fixed-size batches when asked."""
        overrides = {"max_duration": 28.0, "freeze_encoder": True, "freeze_encoder_steps": 0}
        if batch_size is not None:
            overrides.update({"batch_size": batch_size, "dynamic_batching": False})
        return overrides

    @staticmethod
    def padded_size(batch):
        """What a step's FLOPs scale with: the windows (each utterance fills the same one)."""
        return batch.sig[0].shape[0]

    def hf_reference(self, brain, device):
        """The same weights as a plain ``WhisperForConditionalGeneration``, and a function from
        a recipe batch to its inputs (log-mel features made ready beforehand)."""
        model = WhisperForConditionalGeneration.from_pretrained(packaged.resolve(self.source))
        if self.hparams["freeze_encoder"]:
            model.model.encoder.requires_grad_(False)
        whisper, pad_id = self.whisper, self.tokenizer.pad_token_id

        def inputs(batch):
            with torch.no_grad():  # log-mel features: the HF loop gets them ready-made
                feats = whisper._get_mel(batch.sig[0].to(device))
            bos, bos_lens = batch.tokens_bos
            eos, _ = batch.tokens_eos
            keep = sb.dataio.dataio.length_to_mask((bos_lens * bos.shape[1]).round(),
                                                   bos.shape[1]).bool()
            return {"input_features": feats,
                    "decoder_input_ids": bos.masked_fill(~keep, pad_id).to(device),
                    "labels": eos.masked_fill(~keep, -100).to(device)}

        return model, inputs, getattr(model.config, "_attn_implementation", "?")
