"""LibriSpeech: the standard tree (``<split>/<spk>/<chapter>/*.flac`` + ``*.trans.txt``) -> CSVs."""

import csv
import logging
from pathlib import Path

import soundfile as sf
from speechbrain.dataio.dataio import merge_csvs as sb_merge_csvs

from speechtune.data import Manifests

logger = logging.getLogger(__name__)

SPLITS = ("train-clean-100", "train-clean-360", "train-other-500",
          "dev-clean", "dev-other", "test-clean", "test-other")
COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]


def prepare_librispeech(data_folder, save_folder, splits, skip_existing=True):
    """Write one manifest per LibriSpeech split.

    Parameters
    ----------
    data_folder : str or Path
        Folder holding the extracted splits, e.g. ``<data_folder>/train-clean-100/19/198/...``
        (the ``LibriSpeech/`` folder of the official tarballs).
    save_folder : str or Path
        Where ``<split>.csv`` files go.
    splits : list of str
        Any of ``SPLITS``.
    skip_existing : bool
        Keep a split's CSV if it already exists (preparation of train-960 takes minutes).

    Returns
    -------
    dict mapping split name to CSV path. Each CSV has columns ``ID,duration,wav,spk_id,wrd``:
    ``ID`` is the utterance id (``19-198-0001``), ``duration`` seconds read from the audio,
    ``wav`` is ``$data_root/<split>/<spk>/<chapter>/<ID>.flac``, ``spk_id`` the speaker folder,
    ``wrd`` the transcript exactly as in ``*.trans.txt`` (upper case; the recipe normalises).
    """
    data_folder, save_folder = Path(data_folder), Path(save_folder)
    save_folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"Unknown LibriSpeech split '{split}'; choose from {SPLITS}")
        split_dir = data_folder / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"{split_dir} not found: data_folder must hold the extracted LibriSpeech splits "
                f"(<data_folder>/{split}/<speaker>/<chapter>/*.flac)"
            )
        csv_path = save_folder / f"{split}.csv"
        out[split] = str(csv_path)
        if skip_existing and csv_path.exists():
            logger.info("%s exists, skipping preparation of %s", csv_path, split)
            continue
        rows = _split_rows(data_folder, split)
        if not rows:
            raise ValueError(f"No utterances found under {split_dir} (no *.trans.txt files?)")
        tmp = csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
        tmp.replace(csv_path)  # a crash mid-write never leaves a truncated manifest
        logger.info("wrote %s (%d utterances)", csv_path, len(rows))
    return out


def _split_rows(data_folder, split):
    rows = []
    for trans in sorted((data_folder / split).glob("*/*/*.trans.txt")):
        spk = trans.parent.parent.name
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{utt_id}.flac"
            if not audio.is_file():
                raise FileNotFoundError(f"{trans} lists {utt_id} but {audio} does not exist")
            info = sf.info(str(audio))
            rel = audio.relative_to(data_folder).as_posix()
            rows.append([utt_id, f"{info.frames / info.samplerate:.3f}", f"$data_root/{rel}",
                         spk, text])
    return rows


def merge_csvs(paths, out_path):
    """Concatenate manifests of one folder (several train or dev splits) into ``out_path``.

    SpeechBrain's ``merge_csvs`` does the merge (and rejects differing headers); it is written
    under a temporary name and renamed, so an interrupted merge never looks finished.
    """
    out_path = Path(out_path)
    if out_path.exists():  # named after its splits, so an existing file is this merge
        return str(out_path)
    tmp = out_path.with_name(f"{out_path.name}.tmp")
    sb_merge_csvs(out_path.parent, [Path(p).relative_to(out_path.parent) for p in paths],
                  tmp.name)
    tmp.replace(out_path)
    return str(out_path)


def prepare_librispeech_recipe(hparams):
    """A recipe's manifests: ``train_splits`` merged, ``dev_splits`` merged, each test split.

    Parameters
    ----------
    hparams : dict
        Needs ``data_folder`` (the LibriSpeech root holding ``train-clean-100/`` etc.),
        ``manifest_folder`` and the ``train_splits``, ``dev_splits``, ``test_splits`` lists.

    Returns
    -------
    Manifests
        CSV paths in the manifest contract (``ID, duration, wav, spk_id, wrd``).
    """
    folder = Path(hparams["manifest_folder"])
    splits = hparams["train_splits"] + hparams["dev_splits"] + hparams["test_splits"]
    csvs = prepare_librispeech(hparams["data_folder"], folder, splits)
    train_name, dev_name = "+".join(hparams["train_splits"]), "+".join(hparams["dev_splits"])
    train = merge_csvs([csvs[s] for s in hparams["train_splits"]], folder / f"{train_name}.csv")
    valid = merge_csvs([csvs[s] for s in hparams["dev_splits"]], folder / f"{dev_name}.csv")
    return Manifests(train=train, valid=valid, tests={s: csvs[s] for s in hparams["test_splits"]})
