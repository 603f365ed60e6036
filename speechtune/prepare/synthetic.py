"""The bundled Synthetic corpus: its manifests are committed, so preparing only finds them."""

from pathlib import Path

from speechtune.data import Manifests

# further bundled test sets: name -> (language, manifest under data_folder)
EXTRA_TESTS = {"en_heldout": ("en", "en_heldout/test.csv"),
               # en/test reverberated and mixed with held-out noises at 5 dB SNR
               # (local/make_noise_rir.py --noisy_test)
               "en_noisy": ("en", "en_noisy/test.csv")}


def prepare_synthetic(hparams):
    """Bundled manifests of ``hparams['language']``, plus the ``extra_tests`` sets.

    Parameters
    ----------
    hparams : dict
        Needs ``data_folder`` (the corpus root, ``recipes/Synthetic/data``), ``language`` and
        ``extra_tests`` (names from ``EXTRA_TESTS``; ``en_heldout``: English in voices and
        sentences no other split has, for measuring what a fine-tune forgets).

    Returns
    -------
    Manifests
        ``<data_folder>/<language>/{train,valid,test}.csv`` (columns ``ID, duration, wav, spk_id,
        wrd, voice, gender``; ``wav`` relative to ``$data_root``) and each extra test set, with
        its language.
    """
    root = Path(hparams["data_folder"])
    unknown = sorted(set(hparams["extra_tests"]) - set(EXTRA_TESTS))
    if unknown:
        raise ValueError(f"extra_tests: no bundled test set {unknown}; bundled: "
                         f"{sorted(EXTRA_TESTS)}")
    paths = {split: root / hparams["language"] / f"{split}.csv"
             for split in ("train", "valid", "test")}
    paths.update({name: root / EXTRA_TESTS[name][1] for name in hparams["extra_tests"]})
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Synthetic manifests not found: {missing}. Check --data_folder (now "
            f"{hparams['data_folder']}) or regenerate the corpus: "
            "python local/make_synthetic_corpus.py --out recipes/Synthetic/data"
        )
    return Manifests(train=str(paths.pop("train")), valid=str(paths.pop("valid")),
                     tests={name: str(p) for name, p in paths.items()},
                     languages={name: EXTRA_TESTS[name][0] for name in hparams["extra_tests"]})
