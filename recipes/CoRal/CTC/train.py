#!/usr/bin/env python3
"""CTC fine-tuning of an SSL encoder on CoRal (Danish), with per-dialect test metrics.

    python train.py hparams/xls_r_300m_da.yaml --data_folder=/data/coral

Preparation is speechtune.prepare.coral (parquet shards -> 16 kHz FLAC + manifests); the training
loop is speechtune.ctc.CTCBrain, shared by every corpus.
"""

import sys

from speechtune.ctc import CTCFamily
from speechtune.prepare.coral import prepare_coral_recipe
from speechtune.recipe import run

if __name__ == "__main__":
    run(sys.argv[1:], prepare_coral_recipe, CTCFamily)
