"""Shared fixtures: offline mode, the bundled corpus, tiny encoders built from configs."""

import csv
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "recipes" / "Synthetic" / "data"

# A micro WavLM for tests: same 320x CNN arithmetic as WavLM-Large, a few thousand parameters.
MICRO_ENCODER = {
    "model_type": "wavlm",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 4,
    "mask_time_prob": 0.0,
    "vocab_size": 32,
}


# A micro Whisper for tests: Whisper's tokenizer layout and prefix, a 4 s window, one layer each.
MICRO_WHISPER = {
    "multilingual": True, "bpe_vocab_size": 300, "chunk_length": 4, "num_mel_bins": 80,
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "max_target_positions": 64, "init_std": 0.05,
}


@pytest.fixture(scope="session")
def micro_encoder_dir(tmp_path_factory):
    """A micro WavLM saved in HF format (local folder, no hub)."""
    from speechtune.models import build_tiny_encoder

    path = tmp_path_factory.mktemp("micro_wavlm")
    cfg = dict(MICRO_ENCODER)
    return build_tiny_encoder(path, cfg.pop("model_type"), **cfg)


@pytest.fixture(scope="session")
def micro_whisper_en_dir(tmp_path_factory):
    """A micro English-only Whisper saved in HF format, its BPE trained on the bundled text."""
    from speechtune.models import build_tiny_whisper

    with open(SYNTHETIC / "en" / "train.csv", newline="", encoding="utf-8") as f:
        texts = [row["wrd"] for row in csv.DictReader(f)]
    return build_tiny_whisper(tmp_path_factory.mktemp("micro_whisper_en"), texts,
                              **{**MICRO_WHISPER, "multilingual": False})


# wav2vec2-large-960h's vocabulary in its id order: <pad> (the CTC blank), <s>, </s>, <unk>, the
# word delimiter |, then upper-case letters by frequency and the apostrophe
VOCAB_960H = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]


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
    from speechtune.models import build_tiny_whisper

    texts = []
    for language in ("en", "da"):
        with open(SYNTHETIC / language / "train.csv", newline="", encoding="utf-8") as f:
            texts += [row["wrd"] for row in csv.DictReader(f)]
    return build_tiny_whisper(tmp_path_factory.mktemp("micro_whisper_multi"), texts,
                              **MICRO_WHISPER)


def write_subset(src_dir, dst_dir, counts):
    """Copy the first ``counts[split]`` rows of each bundled manifest, wav paths made absolute."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        with open(src_dir / f"{split}.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for _, r in zip(range(n), reader, strict=False)]
            fields = reader.fieldnames
        for r in rows:
            r["wav"] = r["wav"].replace("$data_root", str(SYNTHETIC))
        with open(dst_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return dst_dir


@pytest.fixture
def synthetic_subset(tmp_path):
    """A data folder with a small English subset of the bundled corpus (same audio files)."""
    write_subset(SYNTHETIC / "en", tmp_path / "data" / "en", {"train": 24, "valid": 6, "test": 6})
    return tmp_path / "data"


def run_recipe(recipe_dir, args, cwd=None, timeout=900):
    """Run a recipe's train.py in a subprocess (offline) and return the completed process."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd or recipe_dir, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc
