#!/usr/bin/env python3
"""Write LibriSpeech manifests: python local/prepare_librispeech.py DATA_FOLDER SAVE_FOLDER [splits]

DATA_FOLDER holds the extracted splits (``train-clean-100/``, ``dev-clean/``, ...). The recipes
call the same function (speechtune.prepare.librispeech) themselves; this is for doing it ahead.
"""

import argparse
import logging

from speechtune.prepare.librispeech import SPLITS, prepare_librispeech

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_folder")
    parser.add_argument("save_folder")
    parser.add_argument("splits", nargs="*", default=["train-clean-100", "dev-clean",
                                                      "test-clean", "test-other"],
                        help=f"any of {', '.join(SPLITS)}")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing CSVs")
    args = parser.parse_args()
    for split, path in prepare_librispeech(args.data_folder, args.save_folder, args.splits,
                                           skip_existing=not args.overwrite).items():
        print(f"{split}: {path}")
