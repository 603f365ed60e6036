"""Random-init models built from a config, for offline tests, the no-download recipes and the
benchmarks: SSL encoders and Whisper (with a locally trained byte-level BPE), saved in HF format.

A yaml names one by ``model: tiny:<preset>`` (``PRESETS``); ``resolve_source`` builds it once in
the run's ``<output_folder>/tiny_model`` (rebuilt when its config changes) and returns the folder,
so it loads like a hub model. Every other source is returned as given (a hub id, a local HF
folder, ``packaged:whisper-base``, which the model wrappers resolve).
"""

import hashlib
import json
import logging
from pathlib import Path

import torch
from speechbrain.utils.distributed import run_on_main
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    Wav2Vec2FeatureExtractor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

logger = logging.getLogger(__name__)

TINY_MARKER = "speechtune_tiny.json"
PREFIX = "tiny:"

#: ``tiny:<name>`` -> (builder, HF config). ``wavlm``: the Synthetic CTC recipe's WavLM;
#: ``whisper``: the Synthetic Whisper recipe's multilingual encoder-decoder (its window is the
#: yaml's ``window_seconds``, its BPE trained on the normalised training transcripts).
PRESETS = {
    "wavlm": ("encoder", {
        "model_type": "wavlm",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        # CNN front end: a learnable 25 ms / 10 ms filterbank (kernel 400, stride 160 samples)
        # and one stride-2 layer: one frame per 20 ms like WavLM-Large's 7-layer CNN, at a
        # tenth of its CPU cost
        "conv_dim": [256, 256],
        "conv_kernel": [400, 3],
        "conv_stride": [160, 2],
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,   # pre-LN transformer: trains from scratch without tricks
        "num_conv_pos_embeddings": 32,  # relative position conv kernel (frames)
        "num_conv_pos_embedding_groups": 8,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "feat_proj_dropout": 0.0,
        "layerdrop": 0.0,
        "mask_time_prob": 0.05,         # SpecAugment-style time masking (train mode only)
        "mask_time_length": 5,          # frames
        "vocab_size": 32,
    }),
    "whisper": ("encoder-decoder", {
        "multilingual": True,           # language + task prefix, like openai/whisper-small
        "bpe_vocab_size": 500,          # BPE tokens learnt from the training text
        "num_mel_bins": 80,
        "d_model": 128,                 # sized for a 10-minute CPU run
        "encoder_layers": 2,
        "decoder_layers": 1,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 512,
        "decoder_ffn_dim": 512,
        "max_target_positions": 64,     # the longest bundled English target has 21 tokens
        # weight init std (HF default 0.02): from scratch, 0.02 leaves the conv front end's
        # output about 30x smaller than the sinusoidal positions (init_scale.py), so at first
        # the encoder output barely depends on the audio; 0.05 aligns soonest
        "init_std": 0.05,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
    }),
}


def resolve_source(source, build_dir, kind, texts=(), window_seconds=None, config=None):
    """``source`` as given, or for ``tiny:<preset>`` the folder of that preset's model, built
    once in ``build_dir`` (DDP-safe; rebuilt when the config or ``texts`` change).

    ``kind``: what the family loads (``encoder`` or ``encoder-decoder``), checked against the
    preset's.
    ``texts``: normalised transcripts a Whisper preset's BPE is trained on; ``window_seconds``:
    a Whisper preset's input window (None: 30 s); ``config``: values replacing the preset's
    (the yaml's ``tiny_config``, e.g. a smaller model for tests)."""
    source = str(source)
    if not source.startswith(PREFIX):
        if config:
            raise ValueError(f"tiny_config is set but model={source} is not a tiny:<preset>: "
                             "drop tiny_config to fine-tune it, or pick a preset ("
                             f"{', '.join(PREFIX + p for p in PRESETS)})")
        return source
    name = source[len(PREFIX):]
    if name not in PRESETS:
        raise ValueError(f"model={source}: no such tiny preset; use one of "
                         f"{', '.join(PREFIX + p for p in PRESETS)}, a hub id or a local folder")
    preset_kind, preset = PRESETS[name]
    if preset_kind != kind:
        fits = ", ".join(PREFIX + p for p, (k, _) in PRESETS.items() if k == kind)
        raise ValueError(f"model={source} is an {preset_kind} model, but this recipe loads "
                         f"{kind} models: use {fits}, a hub id or a local folder")
    config = {**preset, **({"chunk_length": 30 if window_seconds is None else window_seconds}
                           if kind == "encoder-decoder" else {}), **dict(config or {})}
    if kind == "encoder-decoder":
        texts = list(texts)
        config["texts_sha1"] = hashlib.sha1("\n".join(sorted(set(texts))).encode()).hexdigest()
    path = Path(build_dir)
    marker = path / TINY_MARKER
    wanted = json.loads(json.dumps({"preset": name, "seed": 0, **config}, default=list))

    def build_if_stale():
        if marker.exists() and json.loads(marker.read_text()) == wanted:
            return
        build = dict(config)
        if kind == "encoder-decoder":
            del build["texts_sha1"]
            build_tiny_whisper(path, texts, **build)
        else:
            build_tiny_encoder(path, build.pop("model_type"), **build)
        marker.write_text(json.dumps(wanted))

    # Every process enters run_on_main (a barrier under DDP), whatever it finds on disk: deciding
    # outside it let a slower process see the marker the main process had just written, skip the
    # barrier, and leave the two waiting in different collectives for ever.
    run_on_main(build_if_stale)
    return str(path)


def build_tiny_encoder(path, model_type="wavlm", seed=0, **config):
    """Write a random-init SSL encoder of ``model_type`` and ``config`` to ``path`` (HF format).

    Also writes the feature extractor (``preprocessor_config.json``: 16 kHz, per-utterance
    normalisation, attention masks) so SpeechBrain's wrapper loads the folder like a hub model.
    """
    path = Path(path)
    with torch.random.fork_rng():  # the run's own random stream is left as it was
        torch.manual_seed(seed)
        model = AutoModel.from_config(AutoConfig.for_model(model_type, **config))
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(path)
    logger.info("built tiny %s encoder (%.2fM parameters) in %s", model_type,
                sum(p.numel() for p in model.parameters()) / 1e6, path)
    return str(path)


# ---------------------------------------------------------------------------- tiny Whisper
WHISPER_VOCAB_MULTILINGUAL = 51865  # SpeechBrain treats a Whisper model as multilingual from here
WHISPER_VOCAB_ENGLISH = 51864  # the ``.en`` models' size: no language/task prefix


def whisper_special_tokens():
    """Whisper's special tokens in Whisper's order: ids of language tokens follow from it."""
    return (["<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
               "<|nocaptions|>", "<|notimestamps|>"])


def build_tiny_whisper(path, texts, multilingual=True, bpe_vocab_size=600, chunk_length=30, seed=0,
                       **config):
    """Write a random-init Whisper with a locally trained tokenizer to ``path`` (HF format).

    The tokenizer is a byte-level BPE trained on ``texts`` (so every script, æ ø å included,
    round-trips) plus Whisper's special tokens in Whisper's order, which is what transformers'
    ``set_prefix_tokens`` and SpeechBrain's wrapper and searchers rely on. ``multilingual`` sizes
    the embedding like the multilingual models (language and task prefix) or like the ``.en``
    ones (no prefix): SpeechBrain decides by ``config.vocab_size``. ``chunk_length`` is the
    encoder's input window in seconds (30 for OpenAI's models; a shorter one trains faster on
    short utterances, with ``speechtune.whisper_models.Whisper``). ``config`` holds
    ``WhisperConfig`` keys (``d_model``, ``encoder_layers``, ...).
    """
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
    hf_config = WhisperConfig(
        vocab_size=WHISPER_VOCAB_MULTILINGUAL if multilingual else WHISPER_VOCAB_ENGLISH,
        decoder_start_token_id=ids("<|startoftranscript|>"), eos_token_id=ids(eot),
        pad_token_id=ids(eot), bos_token_id=ids(eot), suppress_tokens=[],
        begin_suppress_tokens=[], max_source_positions=chunk_length * 50, **config)
    with torch.random.fork_rng():  # the run's own random stream is left as it was
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(hf_config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=hf_config.num_mel_bins,
                            chunk_length=chunk_length).save_pretrained(path)
    logger.info("built tiny Whisper (%.2fM parameters, %d-token BPE, %g s window) in %s",
                sum(p.numel() for p in model.parameters()) / 1e6, len(tokenizer), chunk_length,
                path)
    return str(path)
