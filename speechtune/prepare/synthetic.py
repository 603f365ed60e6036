"""The bundled Synthetic corpus: its manifests are committed, so preparing only finds them."""

from pathlib import Path

from speechtune.recipe import Manifests


def prepare_synthetic(hparams):
    """Bundled manifests of ``hparams['language']``.

    Parameters
    ----------
    hparams : dict
        Needs ``data_folder`` (the corpus root, ``recipes/Synthetic/data``) and ``language``.

    Returns
    -------
    Manifests
        ``<data_folder>/<language>/{train,valid,test}.csv`` (columns ``ID, duration, wav, spk_id,
        wrd, voice, gender``; ``wav`` relative to ``$data_root``).
    """
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
