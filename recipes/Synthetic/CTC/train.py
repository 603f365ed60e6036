#!/usr/bin/env python3
"""CTC fine-tuning on the bundled Synthetic corpus (espeak-ng speech, English and Danish).

    python train.py hparams/wavlm_tiny.yaml                 # English, tiny WavLM built offline
    python train.py hparams/wavlm_tiny.yaml --language=da   # Danish

The corpus is committed in ../data (make it anew with local/make_synthetic_corpus.py); the
training loop is speechtune.ctc.CTCBrain, shared by every corpus.
"""

import sys
from pathlib import Path

from speechtune.recipe import Manifests, run_ctc


def prepare(hparams):
    """Bundled manifests of ``hparams['language']``: <data_folder>/<lang>/{train,valid,test}.csv."""
    lang_dir = Path(hparams["data_folder"]) / hparams["language"]
    paths = {split: lang_dir / f"{split}.csv" for split in ("train", "valid", "test")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Synthetic manifests not found: {missing}. Check --data_folder (now "
            f"{hparams['data_folder']}) or regenerate the corpus: "
            "python local/make_synthetic_corpus.py --out recipes/Synthetic/data"
        )
    return Manifests(train=str(paths["train"]), valid=str(paths["valid"]),
                     tests={"test": str(paths["test"])})


if __name__ == "__main__":
    run_ctc(sys.argv[1:], prepare)
