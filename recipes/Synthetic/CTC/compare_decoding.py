#!/usr/bin/env python3
"""Test WER and speed of greedy, beam and beam + LM decoding of one finished run (the numbers of
the README's decoding table).

    python compare_decoding.py hparams/wavlm_tiny.yaml <training overrides> --lm_path=LM

With the best-WER checkpoint it computes the test log-probs once (the forward pass is timed on
its own), then decodes them with each decoder, one utterance at a time, timing the decoding
only. The LM weights are the yaml's (lm_weights: tuned reads what tune_lm.py wrote).
"""

import sys
import time

from speechtune import ctc_decoding as decoding
from speechtune import lm_tuning as tuning
from speechtune.prepare.synthetic import prepare_synthetic


def compare(argv):
    """Print one markdown row per decoder and test split."""
    hparams, experiment, ckpt = tuning.load_finished_run(argv, prepare_synthetic)
    brain, blank = experiment.brain, hparams["blank_index"]
    alpha, beta = decoding.lm_weights(hparams)
    decoders = {
        "greedy": decoding.GreedyDecoder(brain.tokenizer, blank),
        "beam": decoding.SearchDecoder(decoding.make_searcher(hparams, brain.tokenizer, "beam")),
        f"beam + LM (alpha {alpha:g}, beta {beta:g})": decoding.SearchDecoder(
            decoding.make_searcher(hparams, brain.tokenizer, "beam_lm", alpha, beta)),
    }
    print(f"checkpoint {ckpt.path.name}, LM {hparams['lm_path']}")
    print("| split | decoding | WER | decoding speed (utt/s) |\n|---|---|---|---|")
    for split, dataset in experiment.tests.items():
        start = time.perf_counter()
        utterances = tuning.collect_log_probs(brain, dataset, experiment.loader_kwargs[split])
        forward = len(utterances) / (time.perf_counter() - start)
        for name, decoder in decoders.items():
            wer, speed = tuning.decode_and_score(decoder, utterances, hparams["wer_computer"])
            print(f"| {split} | {name} | {wer:.2f}% | {speed:.1f} |", flush=True)
        print(f"| {split} | (encoder + head forward pass, batched) | | {forward:.1f} |")


if __name__ == "__main__":
    compare(sys.argv[1:])
