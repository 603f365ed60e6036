#!/usr/bin/env python3
"""CTC fine-tuning of an SSL encoder on a CommonVoice language.

    python train.py hparams/wav2vec2_large_960h_en.yaml --data_folder=/data/cv-corpus-17.0/en
    python train.py hparams/xls_r_300m.yaml --language=da --data_folder=/data/cv-corpus-17.0/da

Preparation is speechtune.prepare.commonvoice; the training loop is speechtune.ctc.CTCBrain,
shared by every corpus.
"""

import sys

from speechtune.ctc import CTCFamily
from speechtune.prepare.commonvoice import prepare_commonvoice_recipe
from speechtune.recipe import run

if __name__ == "__main__":
    run(sys.argv[1:], prepare_commonvoice_recipe, CTCFamily)
