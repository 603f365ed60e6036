#!/usr/bin/env python3
"""Tune the n-gram LM weights (alpha, beta) on the validation set of a finished run.

    python tune_lm.py hparams/wavlm_tiny.yaml --lm_path=results/lm/en_3gram.arpa

Give the same yaml and overrides as the training run; it loads the best-WER checkpoint, computes
the valid log-probs once, decodes them for every lm_alpha_grid x lm_beta_grid point with the
decoder_backend's beam search (the points shared among num_workers processes: --num_workers=2
on two cores) and writes <output_folder>/lm_tuning/ (grid.md, grid.csv, lm_weights.yaml).
Then test with the tuned weights:
    python train.py hparams/wavlm_tiny.yaml --decoding=beam_lm --lm_path=<same LM>
"""

import sys

from speechtune.lm_tuning import tune
from speechtune.prepare.synthetic import prepare_synthetic

if __name__ == "__main__":
    tune(sys.argv[1:], prepare_synthetic)
