"""Noise and reverberation manifests for SpeechBrain's ``AddNoise`` / ``AddReverb``, checked
when the yaml loads (``add_noise``, ``noise_manifest``, ``add_reverb``, ``rir_manifest`` in
hparams/augment.yaml): a switched-on augmentation with a missing or malformed manifest stops the
run before any work, naming the key and the fix, instead of failing at the first training batch.
"""

import csv
from pathlib import Path

MAKE = ("make the bundled set with `python local/make_noise_rir.py` (from the repository root: "
        "recipes/Synthetic/data/noise/noise_train.csv and rir_train.csv) or point it at CSVs of "
        "MUSAN / RIRS_NOISES (docs/robustness.md)")
# the placeholder a manifest's wav paths may start with, replaced by the manifest's own folder
FOLDER_KEYS = {"noise_manifest": "noise_folder", "rir_manifest": "rir_folder"}
NOISE_KEYS = ("add_noise", "noise_manifest", "snr_low", "snr_high", "add_reverb", "rir_manifest")


def manifest(enabled, path, key):
    """``path`` as an absolute path when the augmentation is ``enabled`` (None when it is off),
    after checking that it is a SpeechBrain noise/RIR CSV (``ID,duration,wav,wav_format,
    wav_opts``) whose every file exists."""
    if not enabled:
        return None
    flag = "add_noise" if key == "noise_manifest" else "add_reverb"
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"{flag} is True but {key}={path} is not a file: {MAKE}, "
                                f"then pass --{key}=<that CSV>.")
    path = Path(path).resolve()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if (reader.fieldnames or [])[:3] != ["ID", "duration", "wav"] or not rows:
        raise ValueError(f"{key}={path} is not a SpeechBrain noise/RIR CSV: it needs the header "
                         f"ID,duration,wav,wav_format,wav_opts and one row per file (has "
                         f"{reader.fieldnames} and {len(rows)} rows); {MAKE}.")
    folder = f"${FOLDER_KEYS[key]}"
    missing = [r["wav"] for r in rows
               if not Path(r["wav"].replace(folder, str(path.parent))).is_file()]
    if missing:
        raise FileNotFoundError(f"{key}={path}: {len(missing)} of its {len(rows)} files do not "
                                f"exist, e.g. {missing[:3]} ({folder} is the CSV's folder); "
                                f"remake the CSV or {MAKE}.")
    return str(path)


def replacements(path, key):
    """``{noise_folder|rir_folder: the manifest's folder}``, for paths written relative to it."""
    return {} if path is None else {FOLDER_KEYS[key]: str(Path(path).resolve().parent)}


def check_passed(augmentation, augmenter, **top_level):
    """Stop when a noise key set at the top level of the yaml (or on the command line) would do
    nothing: it differs from the one the ``augmentation`` block was built with (a recipe that
    includes hparams/augment.yaml with its own keys must pass these on), or noise/reverberation
    is on while the ``augmenter`` in use is not that block's (``null``: no augmentation)."""
    differ = [k for k, v in top_level.items() if augmentation[k] != v]
    if differ:
        raise ValueError(
            f"{', '.join(f'{k}={top_level[k]}' for k in differ)} not passed into this recipe's "
            "`augmentation` block (it includes hparams/augment.yaml with its own keys): add "
            + ", ".join(f"`{k}: !ref <{k}>`" for k in NOISE_KEYS) + " under its !include.")
    on = [k for k in ("add_noise", "add_reverb") if top_level[k]]
    if on and augmenter is not augmentation["augmenter"]:
        raise ValueError(f"{' and '.join(on)} True, but the augmenter in use is "
                         f"{'null (no augmentation)' if augmenter is None else augmenter}, not "
                         "the augmentation block's: also pass "
                         "--augmenter='!ref <augmentation[augmenter]>'.")
    return True
