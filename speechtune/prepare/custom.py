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
import errno
import io
import json
import math
import os
import re
import stat
import unicodedata
from pathlib import Path

import soundfile as sf
from speechbrain.utils.distributed import run_on_main

from speechtune.data import Manifests, read_utf8, write_manifest
from speechtune.prepare.files import read_stamp, write_stamp

ALIASES = {"wav": ("audio", "wav"), "wrd": ("text", "wrd"), "ID": ("id", "ID"),
           "spk_id": ("speaker", "spk_id"), "duration": ("duration",)}
# computed by the recipe from the contract columns
RESERVED = {"words", "target", "sig", "tokens", "event_tags", "utt_language"}
COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]
FORMAT = ("a CSV (with a header row) or a JSONL file (one JSON object per line) with an audio "
          "column (`audio` or `wav`) and a text column (`text` or `wrd`); optional `id`, "
          "`speaker`, `duration` and any group columns")


class ManifestError(ValueError):
    """An input manifest cannot be prepared; the message names the file, the row and the fix."""


def _where(row, first, last):
    """``row 3 (line 5)``: the row counts data rows from 1 (as default ids do), the lines are the
    file's own, as an editor numbers them (a quoted line break makes a row span lines)."""
    return f"row {row} (line {first})" if first == last else f"row {row} (lines {first}-{last})"


def read_rows(path):
    """The rows of a CSV or JSONL manifest as ``[(where, {column: str})]``, ``where`` naming the
    row and its line(s) for messages (``_where``); blank lines are skipped."""
    path = Path(path)
    problem = describe_missing_audio(path)
    if problem is not None and not problem.startswith("is empty"):  # empty: "has no rows"
        raise ManifestError(f"{path}: manifest {problem}. Fix: give the path of {FORMAT}.")
    if path.suffix not in (".jsonl", ".csv"):
        raise ManifestError(f"{path}: unknown manifest type '{path.suffix}'. Fix: {FORMAT}.")
    try:
        text = read_utf8(path)  # UTF-8, with or without a byte-order mark
    except ValueError as err:
        raise ManifestError(str(err)) from None
    rows = []
    if path.suffix == ".jsonl":
        # JSON escapes CR and LF inside strings, so these are the line breaks; str.splitlines
        # also split at U+2028, U+0085 (NEL) ..., which JSON writes raw inside a transcript
        for number, line in enumerate(re.split(r"\r\n?|\n", text), 1):
            if not line.strip():
                continue
            where = _where(len(rows) + 1, number, number)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}, {where}: not JSON ({err}). Fix: one JSON "
                                    "object per line, e.g. {\"audio\": \"a.wav\", \"text\": "
                                    "\"...\"}.") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}, {where}: a JSON object is needed, got "
                                    f"{type(row).__name__}.")
            rows.append((where, {k: "" if v is None else str(v) for k, v in row.items()}))
        return rows
    with io.StringIO(text, newline="") as f:  # newline="": quoted line breaks kept
        reader = csv.reader(f)
        header = next(reader, [])
        while True:
            first = reader.line_num + 1  # line_num: the lines read so far, to a record's end
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise ManifestError(f"{path}, row {len(rows) + 1} (from line {first}): {err}. "
                                    "Fix: check its quotes (a quoted field runs to the next "
                                    "quote, across lines: an unclosed one takes in the rest of "
                                    "the file).") from None
            if not fields:
                continue  # a blank line
            where = _where(len(rows) + 1, first, reader.line_num)
            if len(fields) > len(header):
                raise ManifestError(f"{path}, {where}: more fields than the header has. Fix: "
                                    "quote fields that contain commas.")
            rows.append((where, dict(zip(header, fields + [""] * (len(header) - len(fields)),
                                         strict=True))))
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


def describe_missing_audio(path) -> str | None:
    """Why ``path`` cannot be read as a file of data, as a phrase to follow its name ("is a
    directory", "is empty (0 bytes)", "is a symlink loop", "is a symlink to a missing file
    <target>", "does not exist", ...), or None for a regular file with bytes this process may
    read. One ``stat`` when the file is fine; more work only on the way to a message."""
    try:
        info = os.stat(path)
    except OSError as err:
        if os.path.islink(path):
            if err.errno == errno.ELOOP:
                return "is a symlink loop"
            return f"is a symlink to a missing file {os.path.realpath(path)}"
        if err.errno == errno.ELOOP:
            return "is under a symlink loop (a folder on its way links back to itself)"
        if err.errno == errno.EACCES:
            return "cannot be reached (permission denied on a folder on its way)"
        return _other_unicode_form(path) or "does not exist"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a pipe, socket or device)"
    if info.st_size == 0:
        return "is empty (0 bytes)"
    if not os.access(path, os.R_OK):
        return "is not readable (permission denied)"
    return None


def _unicode_form(name):
    return next((f for f in ("NFC", "NFD") if unicodedata.is_normalized(f, name)), "mixed")


def _other_unicode_form(path):
    """For a missing ``path``: a phrase naming the path that exists with the same names in
    another Unicode normalisation form (macOS writes file names in NFD, most tools NFC), or
    None. Lists only the folders where a name is not found as spelled."""
    path = Path(os.path.abspath(path))
    found, differ = Path(path.anchor), []
    for part in path.parts[1:]:
        if not os.path.lexists(found / part):
            try:
                names = os.listdir(found)
            except OSError:
                return None
            want = unicodedata.normalize("NFC", part)
            twin = next((n for n in names if unicodedata.normalize("NFC", n) == want), None)
            if twin is None:
                return None
            differ.append(f"{ascii(part)} ({_unicode_form(part)}) here, {ascii(twin)} "
                          f"({_unicode_form(twin)}) on disk")
            part = twin
        found = found / part
    if not differ:  # every name as spelled: the error was another (a file used as a folder)
        return None
    return (f"is not there as spelled, but {found} is: the same name in another Unicode "
            f"normalisation form ({'; '.join(differ)}; macOS writes file names in NFD)")


# describe_missing_audio's phrases by their start -> the pre-flight's problem kind (each kind has
# its own fix there, speechtune.preflight.FIXES)
PATH_KINDS = [("is empty", "empty_audio"), ("is a directory", "not_an_audio_file"),
              ("is not a regular file", "not_an_audio_file"), ("is a symlink", "broken_symlink"),
              ("is under a symlink loop", "broken_symlink"),
              ("is not there as spelled", "audio_name_form"),
              ("cannot be reached", "audio_permission"), ("is not readable", "audio_permission"),
              ("", "missing_audio")]


def path_problem_kind(phrase):
    """The pre-flight's problem kind of a ``describe_missing_audio`` phrase."""
    return next(kind for start, kind in PATH_KINDS if phrase.startswith(start))


AUDIO_FIXES = {  # by the start of describe_missing_audio's phrase
    "is not there as spelled": "spell the name in the manifest as the file system does "
                               "(unicodedata.normalize('NFD', ...) or 'NFC'), or rename the file",
    "is a directory": "name an audio file inside it",
    "is empty": "re-export the audio, or drop the row",
    "is a symlink": "repair the link (ln -sf TARGET LINK), or name the audio file itself",
}


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
    problem = describe_missing_audio(wav)
    if problem is not None:
        fix = next((f for start, f in AUDIO_FIXES.items() if problem.startswith(start)),
                   "check the path (relative paths start at the manifest's folder; $data_root "
                   "is the yaml's data_folder), or drop the row")
        raise ManifestError(f"{path}, {where}: audio file {wav} {problem}. Fix: {fix}.")
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
    out, first_seen = [], {}
    for index, (where, row) in enumerate(rows, 1):
        utt_id = row.get(found.get("ID"), "").strip() or f"{split}_{index:06d}"
        if utt_id in first_seen:
            raise ManifestError(f"{path}: id {utt_id!r} in {first_seen[utt_id]} and {where}. "
                                "Fix: make ids unique (or drop the id column).")
        first_seen[utt_id] = where
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
