"""Shared fixtures: offline mode, the packaged whisper-base, micro models built from configs,
a small subset of the bundled corpus. Helpers and fake corpora are the ``fakes`` package."""

import csv
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from fakes import MICRO_ENCODER, MICRO_WHISPER, SYNTHETIC, VOCAB_960H, write_subset  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def packaged_cache(tmp_path_factory):
    """Packaged models convert into this session's own cache (once per session, as on a user's
    first run); recipe subprocesses inherit it."""
    os.environ["SPEECHTUNE_CACHE"] = str(tmp_path_factory.mktemp("speechtune_cache"))
    return Path(os.environ["SPEECHTUNE_CACHE"])


@pytest.fixture(scope="session")
def whisper_base_dir(packaged_cache):
    """packaged:whisper-base converted to a transformers folder (OpenAI's real weights)."""
    from speechtune.packaged import resolve

    return Path(resolve("packaged:whisper-base"))


@pytest.fixture(scope="session")
def micro_encoder_dir(tmp_path_factory):
    """A micro WavLM saved in HF format (local folder, no hub)."""
    from speechtune.tiny import build_tiny_encoder

    path = tmp_path_factory.mktemp("micro_wavlm")
    cfg = dict(MICRO_ENCODER)
    return build_tiny_encoder(path, cfg.pop("model_type"), **cfg)


@pytest.fixture(scope="session")
def micro_whisper_en_dir(tmp_path_factory):
    """A micro English-only Whisper saved in HF format, its BPE trained on the bundled text."""
    from speechtune.tiny import build_tiny_whisper

    with open(SYNTHETIC / "en" / "train.csv", newline="", encoding="utf-8") as f:
        texts = [row["wrd"] for row in csv.DictReader(f)]
    return build_tiny_whisper(tmp_path_factory.mktemp("micro_whisper_en"), texts,
                              **{**MICRO_WHISPER, "multilingual": False})


@pytest.fixture(scope="session")
def micro_ctc_960h_dir(tmp_path_factory):
    """A micro ``Wav2Vec2ForCTC`` laid out like facebook/wav2vec2-large-960h: its vocabulary and
    tokenizer, a CTC head, a group-norm CNN and a feature extractor without attention masks."""
    import json

    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    path = tmp_path_factory.mktemp("micro_960h")
    torch.manual_seed(0)
    config = {k: v for k, v in MICRO_ENCODER.items() if k != "model_type"}
    config.update(feat_extract_norm="group", do_stable_layer_norm=False,
                  vocab_size=len(VOCAB_960H), pad_token_id=0, ctc_loss_reduction="mean")
    Wav2Vec2ForCTC(Wav2Vec2Config(**config)).save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(VOCAB_960H)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), unk_token="<unk>",
                                     pad_token="<pad>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=False)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def micro_whisper_multi_dir(tmp_path_factory):
    """A micro multilingual Whisper (language and task prefix) saved in HF format, its BPE
    trained on the bundled English and Danish text (æ, ø, å round-trip)."""
    from speechtune.tiny import build_tiny_whisper

    texts = []
    for language in ("en", "da"):
        with open(SYNTHETIC / language / "train.csv", newline="", encoding="utf-8") as f:
            texts += [row["wrd"] for row in csv.DictReader(f)]
    return build_tiny_whisper(tmp_path_factory.mktemp("micro_whisper_multi"), texts,
                              **MICRO_WHISPER)


@pytest.fixture
def synthetic_subset(tmp_path):
    """A data folder with a small English subset of the bundled corpus (same audio files)."""
    write_subset(SYNTHETIC / "en", tmp_path / "data" / "en", {"train": 24, "valid": 6, "test": 6})
    return tmp_path / "data"
