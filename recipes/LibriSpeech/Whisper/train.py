#!/usr/bin/env python3
"""Whisper fine-tuning (decoder by default) on LibriSpeech.

    python train.py hparams/whisper_small_en.yaml --data_folder=/path/to/LibriSpeech
    python train.py hparams/whisper_medium_en.yaml --data_folder=/path/to/LibriSpeech

Preparation is speechtune.prepare.librispeech; the training loop is
speechtune.whisper.WhisperBrain, shared by every corpus.
"""

import sys

from speechtune.prepare.librispeech import prepare_librispeech_recipe
from speechtune.recipe import run
from speechtune.whisper import WhisperFamily

if __name__ == "__main__":
    run(sys.argv[1:], prepare_librispeech_recipe, WhisperFamily)
