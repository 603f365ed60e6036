#!/usr/bin/env python3
"""Write CoRal manifests: python local/prepare_coral.py DATA_FOLDER SAVE_FOLDER

DATA_FOLDER is a snapshot of the dataset repo (``huggingface-cli download alexandrainst/coral
--repo-type dataset --local-dir DATA_FOLDER``). SAVE_FOLDER receives ``<split>.csv``,
``skipped_<split>.tsv`` and the decoded audio (``audio/<split>/<ID>.flac``). The recipes call the
same function (speechtune.prepare.coral) themselves; this is for doing it ahead:

    python local/prepare_coral.py /data/coral data/coral_read_aloud --coral_subset read_aloud

To reuse what this wrote, pass the same folder to the recipe as --manifest_folder (e.g.
--manifest_folder=data/coral_read_aloud, as an absolute path or from where you run the recipe)
with the same --coral_subset, --language and --sample_rate: otherwise the recipe prepares again.
The recipes prepare whole splits (no duration limits; they drop training utterances outside their
min_duration/max_duration themselves), so manifests written with --min_duration/--max_duration
are not reused: the recipe prepares again (reusing the decoded audio). Under DDP (torchrun), run
this first: the recipe prepares on one process while the others wait, and SpeechBrain's barrier
times out after 2 h.
"""

import argparse
import logging

from speechtune.prepare.coral import SPLITS, SUBSETS, prepare_coral

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("data_folder", help="the dataset snapshot")
    parser.add_argument("save_folder", help="where <split>.csv, skipped_<split>.tsv and audio/ "
                                            "go (the recipe's --manifest_folder)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--coral_subset", "--subset", default="read_aloud", choices=SUBSETS)
    parser.add_argument("--language", default="da", help="text normaliser (default: da)")
    parser.add_argument("--sample_rate", type=int, default=16000,
                        help="Hz of the written FLAC files (default: 16000)")
    parser.add_argument("--min_duration", type=float, default=None,
                        help="seconds; shorter utterances are skipped (all --splits; the recipes "
                             "then prepare again)")
    parser.add_argument("--max_duration", type=float, default=None,
                        help="seconds; longer utterances are skipped (all --splits; the recipes "
                             "then prepare again)")
    parser.add_argument("--prepare_workers", "--workers", type=int, default=1,
                        help="processes decoding the audio to FLAC (default: 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite existing CSVs (written FLAC files are still reused)")
    args = parser.parse_args()
    csvs = prepare_coral(args.data_folder, args.save_folder, language=args.language,
                         subset=args.coral_subset, splits=args.splits,
                         sample_rate=args.sample_rate, min_duration=args.min_duration,
                         max_duration=args.max_duration, skip_existing=not args.overwrite,
                         num_workers=args.prepare_workers)
    for split, path in csvs.items():
        print(f"{split}: {path}")
