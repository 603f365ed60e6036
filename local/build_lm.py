#!/usr/bin/env python3
"""Build a word n-gram LM for CTC beam search from text files and/or manifests.

    python local/build_lm.py --language en --order 3 --out results/lm/en_3gram.arpa \\
        recipes/Synthetic/data/en/train.csv

Inputs: manifest CSVs (their ``wrd`` column: e.g. the training transcripts) or text files (one
sentence per line), normalised with the recipes' normaliser of ``--language``. Writes the ARPA
file (KenLM's ``lmplz`` if on PATH, else interpolated modified Kneser-Ney written by
speechtune.ngram) and, if KenLM's ``build_binary`` is on PATH, ``<stem>.bin`` beside it. Pass the
path as the recipe's ``--lm_path``.
"""

import argparse
import logging

from speechtune.ngram import build_lm, read_sentences

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="manifest CSVs (wrd column) or text files")
    parser.add_argument("--language", required=True, help="text normaliser (speechtune.text)")
    parser.add_argument("--order", type=int, default=3, help="n-gram order (default 3)")
    parser.add_argument("--prune", type=int, nargs="*", default=[0],
                        help="count thresholds per order, lmplz-style: 0 0 1 drops trigrams "
                             "(and longer) seen once (default: no pruning)")
    parser.add_argument("--case", choices=("lower", "upper"), default="lower",
                        help="the CTC recipe's target_case (upper for wav2vec2-large-960h's "
                             "vocabulary; default lower, what the normalisers write)")
    parser.add_argument("--out", required=True, help="ARPA file to write (*.arpa)")
    args = parser.parse_args()
    if not args.out.endswith(".arpa"):
        parser.error(f"--out {args.out}: name the ARPA file *.arpa")
    sentences = read_sentences(args.inputs, args.language)
    if args.case == "upper":
        sentences = [[word.upper() for word in words] for words in sentences]
    for path in build_lm(sentences, args.order, args.prune, args.out):
        print(f"wrote {path}")
