#!/usr/bin/env python3
"""CTC fine-tuning of an SSL encoder (WavLM-Large by default) on LibriSpeech.

    python train.py hparams/wavlm_large.yaml --data_folder=/path/to/LibriSpeech
    python train.py hparams/wavlm_large_paper.yaml --data_folder=/path/to/LibriSpeech

Preparation is speechtune.prepare.librispeech; the training loop is speechtune.ctc.CTCBrain,
shared by every corpus.
"""

import sys

from speechtune.ctc import CTCFamily
from speechtune.prepare.librispeech import prepare_librispeech_recipe
from speechtune.recipe import run

if __name__ == "__main__":
    run(sys.argv[1:], prepare_librispeech_recipe, CTCFamily)
