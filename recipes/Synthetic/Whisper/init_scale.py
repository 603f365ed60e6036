#!/usr/bin/env python3
"""How much a random-init Whisper encoder's output depends on the audio, per weight init std.

    cd recipes/Synthetic/Whisper && python init_scale.py

For the tiny config of hparams/whisper_tiny.yaml at several ``init_std`` values, on two bundled
English utterances: the std of the conv front end's output, the std of the sinusoidal position
embeddings added to it, and the mean absolute difference between the two utterances' encoder
outputs (numbers quoted in this folder's README).
"""

import csv
import tempfile
from pathlib import Path

import soundfile as sf
import torch
from transformers import WhisperModel

from speechtune.tiny import build_tiny_whisper
from speechtune.whisper_models import Whisper

DATA = Path(__file__).resolve().parent.parent / "data" / "en"
TINY = {"chunk_length": 4, "num_mel_bins": 80, "d_model": 128, "encoder_layers": 2,
        "decoder_layers": 1, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
        "encoder_ffn_dim": 512, "decoder_ffn_dim": 512, "max_target_positions": 64}

with open(DATA / "train.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
wavs = [sf.read(DATA / "wav" / f"{rows[i]['ID']}.flac", dtype="float32")[0] for i in (0, 5)]
batch = torch.zeros(2, max(len(w) for w in wavs))
for i, w in enumerate(wavs):
    batch[i, : len(w)] = torch.from_numpy(w)

with tempfile.TemporaryDirectory() as tmp:
    path = build_tiny_whisper(Path(tmp) / "m", [r["wrd"] for r in rows], **TINY)
    wrapper = Whisper(path, str(Path(tmp) / "cache"), language="en")
    mel = wrapper._get_mel(batch)
    config = wrapper.model.config

print("init_std  conv_out_std  position_std  encoder_diff_between_utterances")
for std in (0.02, 0.05, 0.1):
    config.init_std = std
    torch.manual_seed(0)
    encoder = WhisperModel(config).encoder.eval()
    with torch.no_grad():
        conv = torch.nn.functional.gelu(encoder.conv2(torch.nn.functional.gelu(encoder.conv1(mel))))
        out = encoder(mel).last_hidden_state
    print(f"{std:<9} {conv.std():<13.3f} {encoder.embed_positions.weight.std():<13.3f} "
          f"{(out[0] - out[1]).abs().mean():.3f}")
