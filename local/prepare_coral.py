#!/usr/bin/env python3
"""Write CoRal manifests: python local/prepare_coral.py DATA_FOLDER SAVE_FOLDER [splits]

DATA_FOLDER is a snapshot of the dataset repo (``huggingface-cli download alexandrainst/coral
--repo-type dataset --local-dir DATA_FOLDER``). SAVE_FOLDER receives ``<split>.csv``,
``skipped_<split>.tsv`` and the decoded audio (``audio/<split>/<ID>.flac``). The recipes call the
same function (speechtune.prepare.coral) themselves; this is for doing it ahead.
"""

import argparse
import logging

from speechtune.prepare.coral import SPLITS, SUBSETS, prepare_coral

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_folder")
    parser.add_argument("save_folder")
    parser.add_argument("splits", nargs="*", default=list(SPLITS),
                        help=f"any of {', '.join(SPLITS)} (default: all)")
    parser.add_argument("--subset", default="read_aloud", choices=SUBSETS)
    parser.add_argument("--language", default="da", help="text normaliser (default: da)")
    parser.add_argument("--sample-rate", type=int, default=16000,
                        help="Hz of the written FLAC files (default: 16000)")
    parser.add_argument("--min-duration", type=float, default=None,
                        help="skip utterances shorter than this many seconds")
    parser.add_argument("--max-duration", type=float, default=None,
                        help="skip utterances longer than this many seconds")
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite existing CSVs (written FLAC files are still reused)")
    args = parser.parse_args()
    csvs = prepare_coral(args.data_folder, args.save_folder, language=args.language,
                         subset=args.subset, splits=args.splits, sample_rate=args.sample_rate,
                         min_duration=args.min_duration, max_duration=args.max_duration,
                         skip_existing=not args.overwrite)
    for split, path in csvs.items():
        print(f"{split}: {path}")
