#!/usr/bin/env python3
"""Tune the n-gram LM weights (alpha, beta) on dev-clean of a finished run.

    python tune_lm.py hparams/wavlm_large.yaml --data_folder=/path/to/LibriSpeech \
        --lm_path=/path/to/lm.arpa

Give the same yaml and overrides as the training run; it loads the best-WER checkpoint, computes
the valid log-probs once, decodes them for every lm_alpha_grid x lm_beta_grid point with the
decoder_backend's beam search (the points shared among num_workers processes: --num_workers=2
on two cores) and writes <output_folder>/lm_tuning/ (grid.md, grid.csv, lm_weights.yaml).
Then test with the tuned weights:
    python train.py <same yaml and overrides> --decoding=beam_lm --lm_path=<same LM>
"""

import sys

from speechtune.lm_tuning import tune
from speechtune.prepare.librispeech import prepare_librispeech_recipe

if __name__ == "__main__":
    tune(sys.argv[1:], prepare_librispeech_recipe)
