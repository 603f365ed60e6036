"""CTC family: one Brain for every encoder (WavLM, wav2vec2, HuBERT; Whisper's encoder alone,
``speechtune.whisper_models``) + linear CTC head.

The shared loop (optimizers, LR schedules, freezing, validation, checkpoints) is
``speechtune.brain.FineTuneBrain``; this module adds the CTC forward/loss and the family's recipe
setup (``speechtune.family``: character vocabulary, pre-flight frame check, data pipelines), its
export (``speechtune.ctc_export``) and its tools' model builder. Keys read here besides the shared
ones (``hparams/ctc.yaml`` declares them all): ``model`` (the encoder's source), ``encoder`` (the
encoder wrapper, built with that source), ``head``; ``augmenter`` (``null`` = no augmentation);
``optim`` groups ``encoder`` and ``head``; ``blank_index``; ``speeds``; ``vocabulary`` and
``target_case`` (below); ``bucket_ratio`` (``speechtune.buckets``); the decoding keys of
``speechtune.ctc_decoding``; ``lora``, ``lora_*`` and ``gradient_checkpointing``
(``speechtune.adapters``: LoRA in the encoder's transformer layers; the head always trains
whole).

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
from transformers import AutoModelForCTC

from speechtune import adapters, buckets, data, tiny
from speechtune.brain import FineTuneBrain
from speechtune.ctc_decoding import GreedyDecoder, build_test_decoder, check_decoding
from speechtune.ctc_export import export_ctc
from speechtune.family import Family
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
        # torch's CTC loss reads its lengths on the host (a sync if they live on a GPU): the
        # batch keeps them from before the copy, for an unaugmented training batch's loss
        batch.host_lengths = (batch.sig.lengths, batch.tokens.lengths)
        batch = batch.to(self.device, non_blocking=True)  # pinned on a GPU: no host wait
        wavs, wav_lens = batch.sig
        if stage == sb.Stage.TRAIN and self.hparams.augmenter is not None:
            wavs, wav_lens = self.augment(wavs, wav_lens)
        frozen = stage != sb.Stage.TRAIN or self.encoder_frozen
        with torch.no_grad() if frozen else contextlib.nullcontext():
            feats, frames = self.encode(wavs, wav_lens)
        logits = self.modules.head(feats)
        log_probs = logits.float().log_softmax(dim=-1)[:, :frames]  # bucket padding cut off
        hyps = None
        if stage != sb.Stage.TRAIN:
            decoder = self.test_decoder if stage == sb.Stage.TEST else self.valid_decoder
            hyps = decoder(log_probs, wav_lens)
        return log_probs, wav_lens, hyps

    def encode(self, wavs, wav_lens):
        """The encoder's features and the number of them that belong to the batch (None: all).

        With ``bucket_ratio`` the batch is padded to its bucket length (``speechtune.buckets``)
        and the features of the unpadded batch's frames come first: the encoder masks the
        padding. The head runs on all of them (one shape per bucket for a compiled head too);
        ``compute_forward`` cuts its output back."""
        ratio = self.hparams.bucket_ratio
        if ratio is None:
            return self.modules.encoder(wavs, wav_lens), None
        padded, padded_lens = buckets.pad(wavs, wav_lens, self.hparams.sample_rate, ratio)
        if self.compile:
            buckets.mark_batch_dynamic(padded, padded_lens)
        feats = self.modules.encoder(padded, padded_lens)
        if self.compile:
            buckets.mark_batch_dynamic(feats)
        return feats, self._own_modules["encoder"].output_frames(wavs.shape[1])

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss in fp32 outside autocast; WER/CER in valid/test."""
        log_probs, wav_lens, hyps = predictions
        tokens, token_lens = batch.tokens
        if stage == sb.Stage.TRAIN and self.hparams.augmenter is not None:
            tokens = self.hparams.augmenter.replicate_labels(tokens)
            token_lens = self.hparams.augmenter.replicate_labels(token_lens)
        elif stage == sb.Stage.TRAIN and hasattr(batch, "host_lengths"):
            wav_lens, token_lens = batch.host_lengths
        with torch.autocast(device_type=self.device_type, enabled=False):
            loss = sb.nnet.losses.ctc_loss(log_probs.float(), tokens, wav_lens, token_lens,
                                           self.hparams.blank_index)
        if stage != sb.Stage.TRAIN:
            targets = [words.split() for words in batch.words]
            self.wer_metric.append(batch.id, hyps, targets)
            self.cer_metric.append(batch.id, hyps, targets)
            raw = zip(batch.wrd, map(" ".join, hyps), strict=True)  # hyps_<split>.tsv
            self.hypotheses.update(zip(batch.id, raw, strict=True))
        return loss


class CTCFamily(Family):
    """The CTC family: an encoder + linear head on a character vocabulary (``speechtune.family``
    for the order of the steps)."""

    name = "ctc"
    brain_class = CTCBrain
    inference_class = "EncoderASR"
    processor_class = "Wav2Vec2Processor"
    summary = "CTC on characters"
    lora_parts = {"encoder": ("encoder.layers",)}

    def __init__(self, hparams):
        super().__init__(hparams)
        self.tokenizer = None
        self.encoder = None  # built by build_model
        self.pretrained_head = None  # the source model's CTC head (vocabulary: pretrained)
        self.lora = None  # run.json's LoRA record (speechtune.adapters), with lora set
        if hparams["vocabulary"] not in ("new", "pretrained"):
            raise ValueError(f"vocabulary={hparams['vocabulary']!r}: use new or pretrained")
        if hparams["target_case"] not in ("lower", "upper"):
            raise ValueError(f"target_case={hparams['target_case']!r}: use lower or upper")

    def build_model(self, train_texts):
        """The ``encoder`` wrapper on the ``model`` source (a ``tiny:`` preset built first)."""
        hp = self.hparams
        self.source = tiny.resolve_source(
            hp["model"], Path(hp["output_folder"]) / "tiny_model", "encoder",
            config=hp["tiny_config"])
        self.encoder = hp["encoder"](source=self.source)
        window = self.encoder.window_seconds  # Whisper's encoder: its (possibly cut) window
        self.lora = adapters.adapt(self.encoder, hp, self.lora_parts, base={
            "source": str(self.source), **({} if window is None else {"window_seconds": window})})

    def set_texts(self, rows, languages):
        """Targets and references are the same transcript, normalised for the split's language
        (``languages``; a replay row's own ``utt_language``), in ``target_case``."""
        case = str.upper if self.hparams["target_case"] == "upper" else str.lower
        for split, split_rows in rows.items():
            for row in split_rows.values():
                normalize = get_normalizer(row.get("utt_language") or languages[split])
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
            labels, blank, delimiter, unk, head = self.encoder.pretrained_ctc()
            if blank != self.hparams["blank_index"]:
                raise ValueError(f"{self.encoder.source} pads (its CTC blank) with id "
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
        hp, encoder = self.hparams, self.encoder
        shrink, stretch = (1.0, 1.0) if hp["augmenter"] is None else \
            speed_length_factors(hp["speeds"])
        rate = hp["sample_rate"]
        labels = ctc_label_check(lambda s: encoder.output_frames(int(s * rate)), shrink)
        window = encoder.window_seconds
        if window is None:  # SSL encoders take any length
            return labels
        fits = seq2seq_label_check(window, float("inf"), len, stretch,
                                   encoder.model_window_seconds)
        return lambda split, row, text: fits(split, row, text) or labels(split, row, text)

    def configure(self, brain):
        """Give the Brain the vocabulary and its validation decoder (greedy: cheap); check the
        test decoding keys now rather than after training, and ``bucket_ratio`` against the
        encoder."""
        brain.tokenizer = self.tokenizer
        brain.valid_decoder = GreedyDecoder(self.tokenizer, self.hparams["blank_index"])
        check_decoding(self.hparams)
        if buckets.check_ratio(self.hparams["bucket_ratio"]) is not None:
            buckets.check_encoder(self.encoder)
            if brain.compile:
                buckets.allow_recompiles()

    def inference_settings(self):
        """What an exported model needs besides its weights (``tools/checkpoints.py export``)."""
        hp, encoder = self.hparams, type(self.encoder)
        return {"language": hp["language"], "sample_rate": hp["sample_rate"],
                "blank_index": hp["blank_index"], "decoding": hp["decoding"],
                "encoder": f"{encoder.__module__}.{encoder.__qualname__}", "lora": self.lora}

    def save_model_files(self, folder):
        """The encoder's HF config and feature extractor (the vocabulary is label_encoder.txt)."""
        self.encoder.model.config.save_pretrained(folder)
        self.encoder.feature_extractor.save_pretrained(folder)

    def add_pipelines(self, datasets):
        """``sig`` and ``tokens`` (character ids of the normalised ``words``)."""
        data.add_audio_pipeline(datasets, self.hparams["sample_rate"])
        tokenizer = self.tokenizer

        @sb.utils.data_pipeline.takes("words")
        @sb.utils.data_pipeline.provides("tokens")
        def text_pipeline(words):
            return torch.LongTensor(tokenizer.encode_sequence(list(words)))

        sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
        sb.dataio.dataset.set_output_keys(datasets,
                                          ["id", "sig", "wrd", "words", "tokens", "duration"])

    def window_seconds(self):
        return self.encoder.window_seconds  # Whisper's encoder: its window; SSL encoders: None

    def modules(self):
        """The encoder and a linear head sized to the vocabulary: new, or the pretrained CTC
        head's weights (``vocabulary: pretrained``; a resumed run then loads its checkpoint)."""
        encoder = self.encoder
        # the feature size: WavLM's hidden_size; transformers' WhisperConfig maps it to d_model
        head = self.hparams["head"](input_size=encoder.model.config.hidden_size,
                                    n_neurons=len(self.tokenizer.lab2ind))
        if self.pretrained_head is not None:
            head.w.load_state_dict(self.pretrained_head)
        return {"encoder": encoder, "head": head}

    @classmethod
    def export(cls, save, ckpts, info, out):
        """``speechtune.ctc_export.export_ctc``."""
        return export_ctc(save, ckpts, info, out)

    @classmethod
    def after_load(cls, asr):
        """The vocabulary was saved whole: say so (SpeechBrain warns otherwise)."""
        asr.tokenizer.expect_len(len(asr.tokenizer.lab2ind))
        return asr

    def setup_summary(self):
        """The character vocabulary."""
        chars = [c for c in self.tokenizer.lab2ind if c not in ("<blank>", "<unk>")]
        return (f"CTC vocabulary ({len(chars)} characters + blank + unk): "
                f"{''.join(chars).replace(' ', '␣')}")

    # ------------------------------------------------------------------ tools/benchmark.py
    benchmark_variants = ("hf", "eager", "sdpa")

    @classmethod
    def build_random_model(cls, folder, config, texts):
        """A random-init SSL encoder of ``config`` (``model_type`` + HF config keys)."""
        config = dict(config)
        return tiny.build_tiny_encoder(folder, config.pop("model_type"), **config)

    @classmethod
    def benchmark_overrides(cls, batch_seconds=None, batch_size=None, real_model=False):
        """The family's part of the benchmark's yaml overrides: the encoder trains from the first
        step; real-size models with the LibriSpeech recipe's masking and no LayerDrop (its
        random skips make step times incomparable)."""
        overrides = {"freeze_encoder_steps": 0}
        if batch_seconds is not None:
            overrides["max_batch_seconds"] = batch_seconds
        if real_model:
            overrides["encoder_config_overrides"] = {"layerdrop": 0.0, "mask_time_prob": 0.05,
                                                     "mask_time_length": 10}
        return overrides

    @staticmethod
    def padded_size(batch):
        """What a step's FLOPs scale with: the padded samples."""
        return batch.sig[0].numel()

    def hf_reference(self, brain, device):
        """The same weights as a plain transformers ``*ForCTC`` model, and a function from a
        recipe batch to its inputs (``tools/benchmark.py``'s ``hf`` row)."""
        hp = self.hparams
        model = AutoModelForCTC.from_pretrained(
            self.source, vocab_size=len(self.tokenizer.lab2ind), pad_token_id=hp["blank_index"],
            ctc_loss_reduction="mean", **dict(hp["encoder_config_overrides"] or
                                              {"layerdrop": 0.0}))
        if hp["freeze_cnn"]:
            model.freeze_feature_encoder()

        def inputs(batch):
            wavs, lens = batch.sig
            mask = sb.dataio.dataio.length_to_mask((lens * wavs.shape[1]).round(), wavs.shape[1])
            tokens, tok_lens = batch.tokens
            keep = sb.dataio.dataio.length_to_mask((tok_lens * tokens.shape[1]).round(),
                                                   tokens.shape[1]).bool()
            return {"input_values": wavs.to(device), "attention_mask": mask.long().to(device),
                    "labels": tokens.masked_fill(~keep, -100).to(device)}

        # transformers' WavLM attention is eager whatever the config says
        attention = "eager" if model.config.model_type == "wavlm" else \
            getattr(model.config, "_attn_implementation", "?")
        return model, inputs, attention
