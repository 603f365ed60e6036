#!/usr/bin/env python3
"""Whisper fine-tuning (decoder NLL) on CoRal (Danish), with per-dialect test metrics.

    python train.py hparams/whisper_small_da.yaml --data_folder=/data/coral

Preparation is speechtune.prepare.coral (parquet shards -> 16 kHz FLAC + manifests); the training
loop is speechtune.whisper's Brain, shared by every corpus.
"""

import sys

from speechtune.prepare.coral import prepare_coral_recipe
from speechtune.recipe import run
from speechtune.whisper import WhisperFamily

if __name__ == "__main__":
    run(sys.argv[1:], prepare_coral_recipe, WhisperFamily)
