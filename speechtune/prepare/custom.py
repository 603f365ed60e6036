"""Your own corpus: one CSV or JSONL manifest per split -> the manifest contract.

The one preparation path for corpora that have no preparation of their own; any recipe can use it
(``tools/new_recipe.py`` writes recipes that do). Each input row names an audio file and its
transcript; column names (either spelling, one per row field):

=============  ===================  ==========================================================
field          input column         notes
=============  ===================  ==========================================================
audio          ``audio`` or ``wav``  a path relative to the manifest's own folder, absolute, or
                                     ``$data_root/...`` (``$data_root`` = yaml ``data_folder``)
text           ``text`` or ``wrd``   the transcript as written; the recipe normalises it
id             ``id`` or ``ID``      optional; default ``<split>_<row number>`` (from 1)
speaker        ``speaker``,          optional; default ``unknown``
               ``spk_id``
duration       ``duration``          optional, seconds; default read from the audio file
anything else  kept as is            group columns (``dialect``, ``gender``, ...)
=============  ===================  ==========================================================

So the bundled ``recipes/Synthetic/data/<lang>/*.csv``, already in the contract, work as input.
"""

import csv
import io
import json
import math
from pathlib import Path

import soundfile as sf
from speechbrain.utils.distributed import run_on_main

from speechtune.data import Manifests, read_utf8, write_manifest
from speechtune.prepare.files import read_stamp, write_stamp

ALIASES = {"wav": ("audio", "wav"), "wrd": ("text", "wrd"), "ID": ("id", "ID"),
           "spk_id": ("speaker", "spk_id"), "duration": ("duration",)}
RESERVED = {"words", "target", "sig", "tokens"}  # computed by the recipe from the contract columns
COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]
FORMAT = ("a CSV (with a header row) or a JSONL file (one JSON object per line) with an audio "
          "column (`audio` or `wav`) and a text column (`text` or `wrd`); optional `id`, "
          "`speaker`, `duration` and any group columns")


class ManifestError(ValueError):
    """An input manifest cannot be prepared; the message names the file, the row and the fix."""


def read_rows(path):
    """The rows of a CSV or JSONL manifest as ``[(line number, {column: str})]``."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found. Fix: give the path of {FORMAT}.")
    if path.suffix not in (".jsonl", ".csv"):
        raise ManifestError(f"{path}: unknown manifest type '{path.suffix}'. Fix: {FORMAT}.")
    try:
        text = read_utf8(path)  # UTF-8, with or without a byte-order mark
    except ValueError as err:
        raise ManifestError(str(err)) from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}, line {number}: not JSON ({err}). Fix: one JSON "
                                    "object per line, e.g. {\"audio\": \"a.wav\", \"text\": "
                                    "\"...\"}.") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}, line {number}: a JSON object is needed, got "
                                    f"{type(row).__name__}.")
            rows.append((number, {k: "" if v is None else str(v) for k, v in row.items()}))
        return rows
    rows = []
    with io.StringIO(text, newline="") as f:
        for row in csv.DictReader(f):
            number = f"line {len(rows) + 2}"  # the header is line 1 (no quoted line breaks)
            if None in row:
                raise ManifestError(f"{path}, {number}: more fields than the header has. Fix: "
                                    "quote fields that contain commas.")
            rows.append((len(rows) + 2, {k: v or "" for k, v in row.items()}))
    return rows


def columns(path, rows):
    """``{contract column: input column}`` and the group columns, in input order."""
    header = list(dict.fromkeys(k for _, row in rows for k in row))  # JSONL: union of keys
    found = {}
    for field, names in ALIASES.items():
        present = [n for n in names if n in header]
        if len(present) > 1:
            raise ManifestError(f"{path}: columns {present} both mean `{field}`. Fix: keep one.")
        if present:
            found[field] = present[0]
    missing = [" or ".join(f"`{n}`" for n in ALIASES[f]) for f in ("wav", "wrd") if f not in found]
    if missing:
        raise ManifestError(f"{path}: no {' and no '.join(missing)} column (columns: {header}). "
                            f"Fix: {FORMAT}.")
    groups = [c for c in header if c not in found.values()]
    reserved = sorted(RESERVED.intersection(groups))
    if reserved:
        raise ManifestError(f"{path}: column(s) {reserved} are reserved (the recipe computes "
                            "them). Fix: rename them.")
    return found, groups


def _resolve_audio(path, where, audio, data_folder):
    """An absolute audio path: ``$data_root`` -> ``data_folder``, relative -> manifest folder."""
    if not audio:
        raise ManifestError(f"{path}, {where}: empty audio path. Fix: fill it in or drop the row.")
    if audio.startswith("$data_root"):
        return str(Path(data_folder).resolve() / audio[len("$data_root"):].lstrip("/\\"))
    audio = Path(audio).expanduser()
    return str(audio if audio.is_absolute() else path.resolve().parent / audio)


def _duration(path, where, row, column, wav):
    if column is not None and row[column].strip():
        try:
            seconds = float(row[column])
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise ManifestError(f"{path}, {where}: duration {row[column]!r} is not a positive "
                                "number of seconds. Fix: correct it, or delete the `duration` "
                                "column to have it read from the audio.")
        return seconds
    if not Path(wav).is_file():
        raise ManifestError(f"{path}, {where}: audio file {wav} not found. Fix: check the path "
                            "(relative paths start at the manifest's folder; $data_root is "
                            "the yaml's data_folder) or drop the row.")
    try:
        info = sf.info(wav)
    except Exception as err:  # soundfile raises several types for broken files
        raise ManifestError(f"{path}, {where}: cannot read audio {wav} ({err}). Fix: re-encode "
                            "it (16 kHz mono WAV/FLAC) or drop the row.") from None
    return info.frames / info.samplerate


def contract_rows(manifest, split, data_folder):
    """The contract rows (``COLUMNS`` + group columns) of one input manifest, and the header."""
    path = Path(manifest)
    rows = read_rows(path)
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows. Fix: add one row per utterance "
                            f"({FORMAT}).")
    found, groups = columns(path, rows)
    out, first_line = [], {}
    for index, (number, row) in enumerate(rows, 1):
        where = f"line {number}"
        utt_id = row.get(found.get("ID"), "").strip() or f"{split}_{index:06d}"
        if utt_id in first_line:
            raise ManifestError(f"{path}: id {utt_id!r} on line {first_line[utt_id]} and line "
                                f"{number}. Fix: make ids unique (or drop the id column).")
        first_line[utt_id] = number
        wav = _resolve_audio(path, where, row.get(found["wav"], "").strip(), data_folder)
        seconds = _duration(path, where, row, found.get("duration"), wav)
        speaker = row.get(found.get("spk_id"), "").strip() or "unknown"
        out.append({"ID": utt_id, "duration": f"{seconds:.3f}", "wav": wav, "spk_id": speaker,
                    "wrd": row.get(found["wrd"], "").strip(),
                    **{g: row.get(g, "") for g in groups}})
    return out, COLUMNS + groups


def prepare_manifest(manifest, out_csv, data_folder, split):
    """Write ``out_csv``, the contract version of one input manifest, unless it is up to date.

    DDP-safe: only the main process writes; every process returns the path. A yaml can call it
    (``!apply:``), e.g. to train the tiny Whisper's BPE on the prepared training text.
    """
    out_csv = Path(out_csv)
    source = {"manifest": str(Path(manifest).resolve()),
              "data_folder": str(Path(data_folder).resolve())}
    stamp = out_csv.with_name(out_csv.name + ".source.json")

    def write():
        if Path(manifest).is_file():
            stat = Path(manifest).stat()
            source.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        if out_csv.is_file() and read_stamp(stamp) == source:
            return  # already prepared from this very file
        rows, header = contract_rows(manifest, split, data_folder)
        write_manifest(out_csv, rows, header)  # atomic: never a half-written manifest
        write_stamp(stamp, source)

    run_on_main(write)
    return str(out_csv)


def prepare_custom(hparams):
    """Contract manifests of a corpus given as one CSV/JSONL manifest per split.

    Parameters
    ----------
    hparams : dict
        ``train_manifest``, ``valid_manifest``: input manifests (CSV or JSONL, columns in the
        module docstring); ``test_manifest``: one more, or null for no test split;
        ``data_folder``: what ``$data_root`` in their audio paths stands for;
        ``manifest_folder``: where the contract manifests go.

    Returns
    -------
    Manifests
        ``<manifest_folder>/{train,valid,test}.csv`` with columns ``ID, duration, wav, spk_id,
        wrd`` then the input's other columns (group columns) in input order: ``ID`` the input id
        or ``<split>_<row number>``, ``duration`` seconds (the input's, else read from the
        audio), ``wav`` an absolute path, ``spk_id`` the speaker or ``unknown``, ``wrd`` the
        transcript as given. Each is written once (by the main process under DDP) and rewritten
        when its input manifest changes (``<split>.csv.source.json`` records which it came from).
    """
    inputs = {"train": hparams["train_manifest"], "valid": hparams["valid_manifest"],
              "test": hparams["test_manifest"]}
    folder = Path(hparams["manifest_folder"])
    out = {split: prepare_manifest(path, folder / f"{split}.csv", hparams["data_folder"], split)
           for split, path in inputs.items() if path is not None}
    return Manifests(train=out["train"], valid=out["valid"],
                     tests={"test": out["test"]} if "test" in out else {})
