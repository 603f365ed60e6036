"""Encoders: SpeechBrain's Hugging Face SSL wrapper with config overrides, and tiny offline models.

Every ``*_hub`` key accepts a hub id (``microsoft/wavlm-large``) or a local folder in HF format.
Tests and the bundled default never download: they build a small random-init model from a config
and save it in HF format to a local folder (``build_tiny_encoder``).
"""

import json
import logging
from pathlib import Path

import torch
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from speechbrain.utils.distributed import run_on_main
from transformers import AutoConfig, AutoModel, Wav2Vec2FeatureExtractor

logger = logging.getLogger(__name__)

TINY_MARKER = "speechtune_tiny.json"


class SSLEncoder(Wav2Vec2):
    """WavLM / wav2vec2 / HuBERT encoder (``AutoModel``) with HF config overrides from yaml.

    Arguments are those of SpeechBrain's ``Wav2Vec2`` plus ``config_overrides``, a dict applied to
    the HF config before the weights load (e.g. ``layerdrop``, ``mask_time_prob``).
    """

    def __init__(self, source, save_path, config_overrides=None, **kwargs):
        object.__setattr__(self, "_config_overrides", dict(config_overrides or {}))
        super().__init__(source, save_path, **kwargs)

    def override_config(self, config):
        """Apply ``config_overrides`` (unknown attribute names are an error)."""
        for key, value in self._config_overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"config_overrides: {type(config).__name__} has no '{key}'")
            setattr(config, key, value)
        if not hasattr(config, "mask_feature_min_masks"):
            # transformers' WavLMConfig lacks this attribute that its channel masking reads
            # (AttributeError as soon as mask_feature_prob > 0); 0 is Wav2Vec2Config's default.
            config.mask_feature_min_masks = 0
        return config

    def output_frames(self, num_samples: int) -> int:
        """Number of encoder frames for ``num_samples`` input samples (the CNN's arithmetic)."""
        n = self.model._get_feat_extract_output_lengths(torch.tensor(num_samples))
        return int(n)


def build_tiny_encoder(path, model_type="wavlm", seed=0, **config):
    """Write a random-init SSL encoder of ``model_type`` and ``config`` to ``path`` (HF format).

    Also writes the feature extractor (``preprocessor_config.json``: 16 kHz, per-utterance
    normalisation, attention masks) so SpeechBrain's wrapper loads the folder like a hub model.
    """
    path = Path(path)
    torch.manual_seed(seed)
    hf_config = AutoConfig.for_model(model_type, **config)
    model = AutoModel.from_config(hf_config)
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(path)
    (path / TINY_MARKER).write_text(json.dumps({"model_type": model_type, "seed": seed, **config},
                                               default=list))
    logger.info("built tiny %s encoder (%.2fM parameters) in %s", model_type,
                sum(p.numel() for p in model.parameters()) / 1e6, path)
    return str(path)


def ensure_tiny_encoder(encoder_hub, build_tiny_encoder_flag, tiny_encoder, build_dir):
    """Resolve the encoder source: ``encoder_hub`` as is, or a tiny model built in ``build_dir``.

    With ``build_tiny_encoder_flag`` false, ``encoder_hub`` (a hub id or local HF folder) is
    returned unchanged. With it true, a random-init model of config ``tiny_encoder``
    (``{model_type: ..., <HF config keys>}``) is built once in ``build_dir`` and reused; then
    ``encoder_hub`` must equal ``build_dir``: a hub id together with the flag is an error, not a
    silent tiny model.
    """
    if not build_tiny_encoder_flag:
        return encoder_hub
    if str(encoder_hub) != str(build_dir):
        raise ValueError(
            f"encoder_hub={encoder_hub} but build_tiny_encoder is True, which builds a random-init "
            f"model in {build_dir}. To fine-tune {encoder_hub}, pass --build_tiny_encoder=False."
        )
    path, config = Path(build_dir), dict(tiny_encoder)
    marker = path / TINY_MARKER
    wanted = json.loads(json.dumps({"seed": 0, **config}, default=list))
    if not marker.exists() or json.loads(marker.read_text()) != wanted:
        run_on_main(build_tiny_encoder, args=[path], kwargs=config)  # once under DDP
    return str(path)


# ---------------------------------------------------------------------------- tiny Whisper
WHISPER_VOCAB_MULTILINGUAL = 51865  # SpeechBrain treats a Whisper model as multilingual from here
WHISPER_VOCAB_ENGLISH = 51864  # the ``.en`` models' size: no language/task prefix


def whisper_special_tokens():
    """Whisper's special tokens in Whisper's order: ids of language tokens follow from it."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return (["<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
               "<|nocaptions|>", "<|notimestamps|>"])


def build_tiny_whisper(path, texts, multilingual=True, bpe_vocab_size=600, seed=0, **config):
    """Write a random-init Whisper with a locally trained tokenizer to ``path`` (HF format).

    The tokenizer is a byte-level BPE trained on ``texts`` (so every script, æ ø å included,
    round-trips) plus Whisper's special tokens in Whisper's order, which is what transformers'
    ``set_prefix_tokens`` and SpeechBrain's wrapper and searchers rely on. ``multilingual`` sizes
    the embedding like the multilingual models (language and task prefix) or like the ``.en``
    ones (no prefix): SpeechBrain decides by ``config.vocab_size``. ``config`` holds
    ``WhisperConfig`` keys (``d_model``, ``encoder_layers``, ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    path = Path(path)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sorted(set(texts)), trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False))
    eot = "<|endoftext|>"
    tokenizer = WhisperTokenizer(tokenizer_object=bpe, bos_token=eot, eos_token=eot,
                                 unk_token=eot, pad_token=eot)
    tokenizer.add_special_tokens({"additional_special_tokens": whisper_special_tokens()})
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    hf_config = WhisperConfig(
        vocab_size=WHISPER_VOCAB_MULTILINGUAL if multilingual else WHISPER_VOCAB_ENGLISH,
        decoder_start_token_id=ids("<|startoftranscript|>"), eos_token_id=ids(eot),
        pad_token_id=ids(eot), bos_token_id=ids(eot), suppress_tokens=[],
        begin_suppress_tokens=[], **config)
    WhisperForConditionalGeneration(hf_config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=hf_config.num_mel_bins).save_pretrained(path)
    (path / TINY_MARKER).write_text(json.dumps(
        {"model_type": "whisper", "multilingual": multilingual, "seed": seed, **config}))
    return str(path)
