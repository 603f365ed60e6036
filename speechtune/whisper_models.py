"""speechtune's Whisper wrappers: the encoder-decoder (``Whisper``) and the encoder alone as a CTC
encoder (``WhisperEncoder``).

``Whisper`` is SpeechBrain's wrapper with a source that may be ``packaged:whisper-base``
(``speechtune.packaged``), an encoder window that may be shorter than the model's, config
overrides, and log-mel features floored per utterance.

``WhisperEncoder``, like SpeechBrain's LibriSpeech recipe ``train_hf_whisper_encoder.yaml``
(``Whisper(encoder_only=True)``), is called as the CTC family calls its encoder:
``encoder(wavs, wav_lens)`` -> ``(batch, frames, d_model)``, one frame per 20 ms. Each utterance is
padded to the encoder window (Whisper has no attention mask), so its features do not depend on
what it is batched with; only the frames the batch's longest utterance covers are returned, so
the CTC lengths (``wav_lens``, relative to the padded batch) index the same frames as for an SSL
encoder. Only the encoder's weights are loaded (``WhisperEncoderOnlyModel``): from a full Whisper
checkpoint (hub id, local folder, ``packaged:whisper-base``) the decoder's are skipped, and an
export (``speechtune.export``) stores the fine-tuned encoder alone. transformers has no Whisper
CTC class: such an export loads with SpeechBrain's ``EncoderASR`` only.
"""


import logging

import torch
from speechbrain.decoders.seq2seq import S2SWhisperBeamSearcher
from speechbrain.integrations.huggingface.whisper import Whisper as SBWhisper
from transformers import AutoConfig, EncoderDecoderCache, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
from transformers.models.whisper.modeling_whisper import WhisperPreTrainedModel

from speechtune import packaged
from speechtune.models import apply_config_overrides, quiet_speechbrain_init

logger = logging.getLogger(__name__)


class Whisper(SBWhisper):
    """SpeechBrain's Whisper wrapper, with an input window of the model's own or shorter.

    ``source``: a hub id, a local HF folder or ``packaged:whisper-base`` (``speechtune.packaged``).
    SpeechBrain pads or cuts every input to 30 s whatever the model; this pads or cuts to the
    feature extractor's ``n_samples``. ``window_seconds`` (None: the model's own, 30 s for
    OpenAI's models) shortens it: the encoder's positional embeddings are cut to the first
    ``window_seconds x 50`` frames and the config and feature extractor say so (what an export
    saves), so the encoder costs about 30 / ``window_seconds`` times less on short utterances.
    Whisper was trained on 30 s windows; how short a window a pretrained model tolerates is
    measured per recipe (the decoder can loop on windows of a few seconds).
    """

    def __init__(self, source, save_path, *args, window_seconds=None, config_overrides=None,
                 **kwargs):
        object.__setattr__(self, "_config_overrides", dict(config_overrides or {}))
        with quiet_speechbrain_init():
            super().__init__(packaged.resolve(source), save_path, *args, **kwargs)
        self.source = str(source)
        self.model_window_seconds = self.window_seconds  # the window the model was trained on
        if window_seconds is not None and window_seconds != self.window_seconds:
            self._set_window(window_seconds)

    def override_config(self, config):
        """Apply ``config_overrides`` (e.g. ``dropout``; unknown names are an error)."""
        return apply_config_overrides(config, self._config_overrides)

    def train(self, mode=True):
        """A frozen encoder stays in eval mode (no dropout): its output depends on the audio
        alone, which the encoder cache relies on."""
        super().train(mode)
        if self.freeze_encoder and not self.encoder_only:
            self.model.encoder.eval()
        return self

    @property
    def frame_samples(self):
        """Input samples per encoder frame: the mel hop (10 ms) times conv2's stride 2."""
        return 2 * self._hop_length

    def _set_window(self, seconds):
        frames = int(round(seconds * self.sampling_rate / self.frame_samples))
        encoder, config = self.model.encoder, self.model.config
        if seconds > self.window_seconds or \
                frames * self.frame_samples != int(seconds * self.sampling_rate):
            raise ValueError(
                f"window_seconds={seconds}: the model's window is {self.window_seconds:g} s; use "
                f"a shorter one in steps of {self.frame_samples / self.sampling_rate:g} s")
        positions = encoder.embed_positions.weight[:frames].detach().clone()
        encoder.embed_positions = torch.nn.Embedding.from_pretrained(positions, freeze=True)
        config.max_source_positions = frames
        self.feature_extractor.chunk_length = seconds
        self.feature_extractor.n_samples = int(seconds * self.sampling_rate)
        self.feature_extractor.nb_max_frames = self.feature_extractor.n_samples // self._hop_length
        self._n_samples = self.feature_extractor.n_samples

    def _get_mel(self, wav):
        return self.log_mel_spectrogram(self.pad_or_trim(wav, self._n_samples))

    def log_mel_spectrogram(self, audio, padding: int = 0):
        """Whisper's log-mel with its 8-decade floor below each utterance's own maximum.

        SpeechBrain floors at the maximum of the whole batch, so an utterance's features
        depended on the loudest utterance batched with it, unlike transformers' (and OpenAI's)
        feature extractor that an exported model meets at inference.
        """
        if padding > 0:
            audio = torch.nn.functional.pad(audio, (0, padding))
        window = torch.hann_window(self._n_fft, device=audio.device)
        stft = torch.stft(audio, self._n_fft, self._hop_length, window=window,
                          return_complex=True)
        log_spec = (self._mel_filters @ stft[..., :-1].abs() ** 2).clamp(min=1e-10).log10()
        floor = log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0
        return (torch.maximum(log_spec, floor) + 4.0) / 4.0

    def forward(self, wav, decoder_input_ids, encoder_grad=True, encoded=None):
        """Log-mel -> encoder (without autograd unless ``encoder_grad``) -> decoder, no KV cache.

        ``encoded``: the encoder's output for ``wav`` if already known (an encoder cache); the
        encoder is then skipped. Training goes through ``forward`` (not ``forward_encoder``/
        ``forward_decoder``) so that under DDP the call passes the wrapper that synchronises
        gradients.
        """
        if encoded is None:
            with torch.set_grad_enabled(
                    torch.is_grad_enabled() and encoder_grad and not self.freeze):
                encoded = self.forward_encoder(self._get_mel(wav))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            # SpeechBrain's forward_decoder with the causal mask given: without one, transformers
            # checks the positions for packed sequences with a host read (a sync per step)
            out = self.model.decoder(encoder_hidden_states=encoded, input_ids=decoder_input_ids,
                                     attention_mask=self.causal_mask(decoder_input_ids),
                                     output_attentions=self.output_attentions, use_cache=False)
            hidden = out.last_hidden_state
            logits = (hidden @ self.model.decoder.embed_tokens.weight.to(hidden.dtype).T).float()
        attn = None
        if self.output_attentions:
            attn = out.attentions[-1].flatten(0, 1)
        return encoded, logits, attn

    def causal_mask(self, tokens):
        """``(batch, 1, T, T)`` additive causal mask in the dtype the decoder computes in (the
        autocast dtype, else its weights'): transformers takes a 4-D mask as it is."""
        device = tokens.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else self.model.dtype)
        batch, length = tokens.shape
        future = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype,
                            device=tokens.device).triu(1)  # 0 on and below the diagonal
        return future.expand(batch, 1, length, length)

    @property
    def window_seconds(self):
        """Longest input in seconds; longer audio would be cut (pre-flight stops it)."""
        return self._n_samples / self.sampling_rate


def prefix_search(searcher, enc, wav_lens, bos):
    """``searcher``'s hypotheses, each utterance decoded after its own decoder prefix's language
    token (``bos[:, 1]``, once per beam): a batch of a pooled valid split (``speechtune.mixing``)
    mixes languages. An English-only model's prefix has no language token: decoded as set."""
    if searcher.model.is_multilingual:
        searcher.set_lang_tokens(bos[:, 1].repeat_interleave(getattr(searcher, "beam_size", 1)))
    return searcher(enc, wav_lens)[0]


def prefix_languages(bos, searcher, tokenizer):
    """Each utterance's language code, read from its decoder prefix; None for an English-only
    model."""
    if not searcher.model.is_multilingual:
        return None
    return [token[2:-2] for token in tokenizer.convert_ids_to_tokens(bos[:, 1].tolist())]


def prefix_normalized(brain, texts, bos):
    """The hypotheses ``texts`` as word lists, each normalised in its utterance's language (its
    decoder prefix's; ``brain.score_normalizers``), or by the split's normaliser
    (``brain.score_normalize``) for an English-only model."""
    languages = prefix_languages(bos, brain.valid_search, brain.tokenizer)
    normalizers = [brain.score_normalizers[lang] for lang in languages] if languages else \
        [brain.score_normalize] * len(texts)
    return [normalize(text).split() for normalize, text in zip(normalizers, texts, strict=True)]


class WhisperBeamSearcher(S2SWhisperBeamSearcher):
    """SpeechBrain's Whisper beam search, without copying the cross-attention cache each step.

    After every step the searcher reorders the decoder's key/value cache to the surviving
    hypotheses. Its cross-attention half holds the encoder's keys and values, the same for every
    hypothesis of an utterance, and the reordering only moves hypotheses within their utterance,
    so copying it (batch x beam x frames x layers, every step) changes nothing. On 2 CPU cores
    that copy was a third of a batched beam-5 test decode
    (``tools/benchmark_whisper_decoding.py``, docs/performance.md)."""

    def _reorder_cache(self, past_key_values, beam_idx):
        if isinstance(past_key_values, EncoderDecoderCache):
            past_key_values.self_attention_cache.reorder_cache(beam_idx)
            return past_key_values
        return super()._reorder_cache(past_key_values, beam_idx)


class WhisperEncoderOnlyModel(WhisperPreTrainedModel):
    """Whisper's encoder as a transformers model: state dict ``encoder.*``, as in
    ``WhisperModel``. Loads from a full Whisper checkpoint (``model.encoder.*`` or ``encoder.*``
    keys; the decoder's are ignored, never built) or from its own ``save_pretrained``."""

    _keys_to_ignore_on_load_unexpected = [r"^(model\.)?decoder\.", r"^proj_out\."]

    def __init__(self, config):
        super().__init__(config)
        self.encoder = HFWhisperEncoder(config)
        # SpeechBrain's encoder_only wrapper moves ``model.decoder`` to the CPU and deletes it
        self.decoder = torch.nn.Module()
        self.post_init()

    def forward(self, input_features, **kwargs):
        return self.encoder(input_features, **kwargs)


class WhisperEncoder(Whisper):
    """Whisper's encoder for the CTC family: ``encoder(wavs, wav_lens)`` -> per-frame features.

    Arguments
    ---------
    source : str
        A hub id, a local HF folder or ``packaged:whisper-base``; only the encoder is loaded.
    save_path : str
        Where hub downloads are cached.
    window_seconds : float, optional
        The encoder's input window (None: the model's own, 30 s for OpenAI's models): every
        utterance is padded to it, so a window just above the longest utterance is cheapest.
    freeze : bool
        No gradients ever (inference); staged freezing in training is ``freeze_encoder_steps``.
    """

    def __init__(self, source, save_path, window_seconds=None, freeze=False):
        super().__init__(source, save_path, encoder_only=True, freeze=freeze,
                         window_seconds=window_seconds)
        self._warned_cut = False

    def _from_pretrained(self, source, save_path, cache_dir, device=None, **kwargs):
        """The encoder's weights only (SpeechBrain loads the whole ``WhisperModel``, then
        deletes its decoder)."""
        self.model = WhisperEncoderOnlyModel.from_pretrained(
            source, config=self.config, cache_dir=save_path, **kwargs)
        if device is not None:
            self.model.to(device)

    def output_frames(self, num_samples: int) -> int:
        """Encoder frames ``forward`` returns for an input of ``num_samples`` samples: one per
        started 20 ms, at most the window's (the pre-flight label check counts these)."""
        frames = -(-int(num_samples) // self.frame_samples)
        return max(1, min(frames, self.model.config.max_source_positions))

    def forward(self, wav, wav_lens=None):
        """Log-mel of each utterance padded to the window -> encoder -> the first
        ``output_frames(wav.shape[1])`` frames (the rest encode the padding of every row).
        ``wav_lens`` (relative) need no mask: Whisper attends to its padding, as in its training."""
        if wav.shape[-1] > self._n_samples and not self._warned_cut:
            logger.warning("%.2f s of audio but the encoder window is %g s: only the first %g s "
                           "are encoded (pre-flight stops this in training; cut long recordings "
                           "for inference)", wav.shape[-1] / self.sampling_rate,
                           self.window_seconds, self.window_seconds)
            self._warned_cut = True
        mel = self._get_mel(wav)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            out = self.forward_encoder(mel)
        return out[:, :self.output_frames(wav.shape[-1])]

    def pretrained_ctc(self):
        """Whisper has no CTC head to start from."""
        raise ValueError(f"vocabulary: pretrained needs a CTC fine-tuned model with its CTC head; "
                         f"{self.source} is a Whisper encoder-decoder, which has none. Use "
                         "vocabulary: new (a character vocabulary and a new head).")

    @classmethod
    def export_encoder(cls, encoder_state, model_files, out):
        """Write the fine-tuned encoder to ``out`` for ``EncoderASR``: ``config.json``,
        ``preprocessor_config.json`` (the run's window) and ``model.safetensors`` (``encoder.*``
        only); returns the ``hyperparams.yaml`` lines of the encoder wrapper loading them.
        ``encoder_state``: the checkpoint's ``encoder`` (this wrapper's state dict)."""
        config = AutoConfig.from_pretrained(model_files)
        with torch.random.fork_rng():  # weights are replaced below; the caller's stream stays
            model = WhisperEncoderOnlyModel(config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in encoder_state.items()
                               if k.startswith("model.")})  # strict: the run's own config
        model.save_pretrained(out)
        extractor = WhisperFeatureExtractor.from_pretrained(model_files)
        extractor.save_pretrained(out)
        window = extractor.n_samples / extractor.sampling_rate
        return (f"!new:{cls.__module__}.{cls.__qualname__}   # the run's {window:g} s window "
                "and log-mel features\n"
                "    source: !ref <export_folder>\n"
                "    save_path: !ref <export_folder>\n"
                "    freeze: True\n")
