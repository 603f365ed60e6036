#!/usr/bin/env python3
"""Whisper fine-tuning (decoder NLL) on Danish corpora mixed by weight: CoRal and CommonVoice.

    python train.py hparams/whisper_small_da_mix.yaml --data_folder=/data

Each corpus is prepared by its own preparation (the yaml's ``corpora`` name them by the keys of
``PREPARERS``); speechtune.mixing merges them and draws the training batches by weight; the
training loop is speechtune.whisper's Brain, shared by every corpus.
"""

import sys

from speechtune.prepare.commonvoice import prepare_commonvoice_recipe
from speechtune.prepare.coral import prepare_coral_recipe
from speechtune.recipe import run
from speechtune.whisper import WhisperFamily

PREPARERS = {"coral": prepare_coral_recipe, "commonvoice": prepare_commonvoice_recipe}

if __name__ == "__main__":
    run(sys.argv[1:], PREPARERS, WhisperFamily)
