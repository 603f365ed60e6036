#!/usr/bin/env python3
"""CTC fine-tuning on the bundled Synthetic corpus (espeak-ng speech, English and Danish).

    python train.py hparams/wavlm_tiny.yaml                 # English, tiny WavLM built offline
    python train.py hparams/wavlm_tiny.yaml --language=da   # Danish

The corpus is committed in ../data (make it anew with local/make_synthetic_corpus.py); the
training loop is speechtune.ctc.CTCBrain, shared by every corpus.
"""

import sys

from speechtune.ctc import CTCFamily
from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import run

if __name__ == "__main__":
    run(sys.argv[1:], prepare_synthetic, CTCFamily)
