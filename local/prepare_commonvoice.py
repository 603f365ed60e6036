#!/usr/bin/env python3
"""Write CommonVoice manifests: python local/prepare_commonvoice.py DATA_FOLDER SAVE_FOLDER LANG

DATA_FOLDER is the locale folder of an extracted release (``.../cv-corpus-17.0/da``: train.tsv,
dev.tsv, test.tsv, clips/*.mp3). The recipes call the same function
(speechtune.prepare.commonvoice) themselves; this is for doing it ahead, e.g. converting the clips
to FLAC once with several processes:

    python local/prepare_commonvoice.py .../cv-corpus-17.0/da data/cv_da da \\
        --resample once --prepare_workers 8 --train_tsv validated

To reuse what this wrote, pass the same folder to the recipe as --manifest_folder (e.g.
--manifest_folder=data/cv_da, as an absolute path or from where you run the recipe) with the
same --language, --train_tsv, --resample and --sample_rate: otherwise the recipe prepares again.
The recipes prepare whole splits (no duration limits; they drop training clips outside their
min_duration/max_duration themselves), so manifests written with --min_duration/--max_duration
are not reused: the recipe prepares again. Under DDP (torchrun), run this first: the recipe
prepares on one process while the others wait, and SpeechBrain's barrier times out after 2 h.
"""

import argparse
import logging

from speechtune.prepare.commonvoice import (
    RESAMPLE,
    SPLITS,
    TRAIN_TSVS,
    prepare_commonvoice,
)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("data_folder", help="the locale folder, e.g. .../cv-corpus-17.0/da")
    parser.add_argument("save_folder", help="where <split>.csv and skipped_<split>.tsv go (the "
                                            "recipe's --manifest_folder)")
    parser.add_argument("language", help="language code of the locale (its text normaliser)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--train_tsv", default="train", choices=TRAIN_TSVS,
                        help="validated: validated.tsv less the dev/test speakers and sentences")
    parser.add_argument("--resample", default="on_the_fly", choices=RESAMPLE,
                        help="once: convert the clips to FLAC at --sample_rate")
    parser.add_argument("--sample_rate", type=int, default=16000, help="Hz, for --resample once")
    parser.add_argument("--min_duration", type=float, default=None,
                        help="seconds; shorter clips are skipped (all --splits; the recipes "
                             "then prepare again)")
    parser.add_argument("--max_duration", type=float, default=None,
                        help="seconds; longer clips are skipped (all --splits; the recipes "
                             "then prepare again)")
    parser.add_argument("--prepare_workers", "--workers", type=int, default=1,
                        help="processes reading mp3 headers and converting clips")
    parser.add_argument("--locale", default=None,
                        help="the locale the TSVs must hold (default: any of the language, "
                             "sv-SE for sv); for a locale whose code names another language")
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite existing CSVs (converted FLACs are kept)")
    args = parser.parse_args()
    for split, path in prepare_commonvoice(
            args.data_folder, args.save_folder, args.language, splits=args.splits,
            train_tsv=args.train_tsv, resample=args.resample, sample_rate=args.sample_rate,
            min_duration=args.min_duration, max_duration=args.max_duration,
            num_workers=args.prepare_workers, skip_existing=not args.overwrite,
            locale=args.locale).items():
        print(f"{split}: {path}")
