#!/usr/bin/env python3
"""Whisper fine-tuning on the bundled Synthetic corpus (espeak-ng speech, English and Danish).

    python train.py hparams/whisper_tiny.yaml                 # English, tiny Whisper built offline
    python train.py hparams/whisper_tiny.yaml --language=da   # Danish
    python train.py hparams/whisper_base.yaml                 # the bundled default: whisper-base

The corpus is committed in ../data; the training loop is speechtune.whisper.WhisperBrain,
shared by every corpus.
"""

import sys

from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import run
from speechtune.whisper import WhisperFamily

if __name__ == "__main__":
    run(sys.argv[1:], prepare_synthetic, WhisperFamily)
