#!/usr/bin/env python3
"""CTC fine-tuning of an SSL encoder (WavLM-Large by default) on LibriSpeech.

    python train.py hparams/wavlm_large.yaml --data_folder=/path/to/LibriSpeech
    python train.py hparams/wavlm_large_paper.yaml --data_folder=/path/to/LibriSpeech

The training loop is speechtune.ctc.CTCBrain, shared by every corpus; this file only prepares
the manifests.
"""

import csv
import sys
from pathlib import Path

from speechtune.prepare.librispeech import prepare_librispeech
from speechtune.recipe import Manifests, run_ctc


def merge_csvs(paths, out_path):
    """Concatenate manifests with the same columns (several train or dev splits) into one."""
    if Path(out_path).exists():  # named after its splits, so an existing file is this merge
        return str(out_path)
    rows, header = [], None
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = header or reader.fieldnames
            rows += list(reader)
    tmp = Path(f"{out_path}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_path)
    return str(out_path)


def prepare(hparams):
    """Manifests for ``train_splits`` (merged), ``dev_splits`` (merged) and each test split."""
    folder = Path(hparams["manifest_folder"])
    splits = hparams["train_splits"] + hparams["dev_splits"] + hparams["test_splits"]
    csvs = prepare_librispeech(hparams["data_folder"], folder, splits)
    train_name, dev_name = "+".join(hparams["train_splits"]), "+".join(hparams["dev_splits"])
    train = merge_csvs([csvs[s] for s in hparams["train_splits"]], folder / f"{train_name}.csv")
    valid = merge_csvs([csvs[s] for s in hparams["dev_splits"]], folder / f"{dev_name}.csv")
    return Manifests(train=train, valid=valid, tests={s: csvs[s] for s in hparams["test_splits"]})


if __name__ == "__main__":
    run_ctc(sys.argv[1:], prepare)
