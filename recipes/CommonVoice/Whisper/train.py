#!/usr/bin/env python3
"""Whisper fine-tuning (decoder NLL) on a CommonVoice language.

    python train.py hparams/whisper_small.yaml --language=da --data_folder=/data/cv-corpus-17.0/da

Preparation is speechtune.prepare.commonvoice; the training loop is speechtune.whisper's Brain,
shared by every corpus.
"""

import sys

from speechtune.prepare.commonvoice import prepare_commonvoice_recipe
from speechtune.recipe import run
from speechtune.whisper import WhisperFamily

if __name__ == "__main__":
    run(sys.argv[1:], prepare_commonvoice_recipe, WhisperFamily)
