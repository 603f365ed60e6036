"""CoRal (Danish): the hub's parquet shards (audio bytes + metadata) -> 16 kHz FLAC + manifests.

CoRal is the HF dataset ``alexandrainst/coral`` (later copies ``CoRal-project/coral``, ``-v2``,
``-v3``): ``huggingface-cli download alexandrainst/coral --repo-type dataset --local-dir
DATA_FOLDER`` (``--include "read_aloud/*"`` for one subset). What this relies on, from the code
that builds and evaluates the corpus (github.com/alexandrainst/coral):

- Subsets (HF configs) ``read_aloud`` and ``conversation``; splits ``train``, ``val``, ``test``
  (``src/scripts/build_coral_asr.py``: ``split_dataset``, and ``upload_dataset`` calling
  ``push_to_hub(config_name=..., max_shard_size="500MB")``).
- Shards: ``push_to_hub`` writes ``<config>/<split>-00000-of-000NN.parquet`` (datasets'
  ``data_dir = config_name``; older versions append ``-<fingerprint>``); the hub's
  parquet-converter branch has ``<config>/<split>/0000.parquet``. Both are accepted, also under
  ``data/<config>/`` or with DATA_FOLDER the config folder itself (named as the subset).
- Columns (``DATASET_README.md``, ``build_read_aloud_dataset``): ``id_recording``,
  ``id_sentence``, ``id_speaker``, ``text``, ``age``, ``gender``, ``dialect``,
  ``country_birth``, ``validated``, ``audio`` (HF ``Audio``: struct ``{bytes, path}`` holding
  the WAV file), and recording/ASR-validation columns not used here. The conversation subset
  has ``id_conversation`` (``<conversation>_<segment>``, one per utterance) instead of
  ``id_recording`` (``build_conversation_dataset``). Also accepted: ``id_segment``, ``id``;
  ``speaker_id``.
- Values: ``age`` an int in the SQLite-built releases, a string ("26") in the v3 card
  (``README_full_conversations_redacted.md``). ``gender`` ``female``/``male``/``nonbinary``
  (``get_coral_split_ids.py``; the card writes ``non-binary``: read as ``nonbinary``).
  ``dialect`` is the self-reported sub-dialect in lower case, which CoRal's evaluation maps to
  9 groups, with ``Non-native`` for a ``country_birth`` other than ``DK`` (``config/
  evaluation.yaml`` ``sub_dialect_to_dialect``; ``src/coral/evaluate.py``); the manifests
  hold those groups (``DIALECTS``; an unmapped value is kept as written).
  Age groups ``0-24``, ``25-49``, ``50+``: the card's and the split script's (``AgeGroup``
  bounds ``[0, 25), [25, 50), [50, -)``). Rows with ``validated == "rejected"`` are dropped, as
  CoRal's ``filter_example`` does. Not confirmed: the v3 utterance-level shard and column names
  (no card found), hence the aliases.
"""

import io
import logging
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from speechtune.data import Manifests, load_audio, write_manifest
from speechtune.prepare.coral_groups import (
    UNKNOWN,
    age_group,
    clean_text,
    dialect_group,
    gender_label,
    label,
)
from speechtune.prepare.files import (
    complete_flac,
    read_stamp,
    remove_stale_temps,
    worker_pool,
    write_flac,
    write_stamp,
    write_tsv,
)
from speechtune.text import get_normalizer

logger = logging.getLogger(__name__)

SUBSETS = ("read_aloud", "conversation")
SPLITS = ("train", "val", "test")
GROUPS = ["dialect", "gender", "age_group"]
COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd", *GROUPS]
# input field -> accepted column names (first present wins); OPTIONAL ones missing -> unknown
FIELDS = {"id": ("id_recording", "id_segment", "id_conversation", "id"), "text": ("text",),
          "audio": ("audio",)}
OPTIONAL = {"speaker": ("id_speaker", "speaker_id"), "age": ("age",), "gender": ("gender",),
            "dialect": ("dialect",), "country_birth": ("country_birth",),
            "validated": ("validated",)}
DOWNLOAD = ("huggingface-cli download alexandrainst/coral --repo-type dataset "
            "--local-dir {folder}")
BATCH_ROWS = 32  # rows decoded at a time: a shard holds ~500 MB of audio, a batch a few MB
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SPACES = re.compile(r"\s+")


class _Skip(Exception):
    """A row that cannot be used; the message is the reason written to the skip report."""


def find_shards(data_folder, subset, split):
    """The parquet shards of one subset and split, sorted; raise naming the folder and the fix."""
    root = Path(data_folder)
    if not root.is_dir():
        raise FileNotFoundError(f"CoRal data folder {root} not found. Fix: download the dataset "
                                f"there: {DOWNLOAD.format(folder=root)}")
    # the data folder itself only when it is the subset's folder (not another subset's shards)
    for folder in (root / subset, root / "data" / subset, *([root] if root.name == subset else [])):
        for pattern in (f"{split}-*.parquet", f"{split}/*.parquet"):  # one layout, never both
            shards = sorted(folder.glob(pattern))
            if shards:
                return shards
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))[:10]
    other = f", the '{root.name}' subset's" if root.name in SUBSETS else ""
    raise FileNotFoundError(
        f"No CoRal shards for subset '{subset}', split '{split}' under {root} (looked for "
        f"{subset}/{split}-*.parquet and {subset}/{split}/*.parquet; parquet files found: "
        f"{found or 'none'}{other}). Fix: data_folder must be a snapshot of the dataset repo "
        f"(or its {subset}/ folder): {DOWNLOAD.format(folder=root)}")


def shard_columns(shard):
    """``{field: column}`` of one shard (required and present optional fields)."""
    try:
        names = pq.ParquetFile(shard).schema_arrow.names
    except Exception as err:  # pyarrow raises several types for a broken file
        with open(shard, "rb") as f:
            lfs = f.read(40).startswith(b"version https://git-lfs")
        hint = "a Git LFS pointer, not the data; " if lfs else ""
        raise ValueError(f"{shard}: not a readable parquet file ({hint}{err}). Fix: download "
                         f"it again: {DOWNLOAD.format(folder='DATA_FOLDER')}") from None
    found = {}
    for field, aliases in {**FIELDS, **OPTIONAL}.items():
        present = [n for n in aliases if n in names]
        if present:
            found[field] = present[0]
        elif field in FIELDS:
            raise ValueError(
                f"{shard}: no {' or '.join(f'`{n}`' for n in aliases)} column (columns found: "
                f"{names}). Fix: data_folder must be a snapshot of alexandrainst/coral "
                f"({DOWNLOAD.format(folder='DATA_FOLDER')}); a corpus in another layout can "
                "use speechtune.prepare.custom instead.")
    return found


def _decode(audio, sample_rate):
    """Mono float32 samples at ``sample_rate`` from the audio cell ({bytes, path} or bytes)."""
    data = audio.get("bytes") if isinstance(audio, dict) else audio
    if not data:
        raise _Skip("audio bytes missing")
    try:
        signal = load_audio(io.BytesIO(data), sample_rate)
    except Exception as err:  # soundfile raises several types for undecodable bytes
        raise _Skip(f"audio undecodable ({str(err).rsplit(': ', 1)[-1]})") from None
    if signal.numel() == 0:
        raise _Skip("audio has no samples")
    return signal.numpy()


def _utterance(value, utt_id, audio_dir, normalize, options):
    """One manifest row from one record's ``{field: value}``; raise ``_Skip`` with the reason."""
    if label(value.get("validated")) == "rejected":
        raise _Skip("validated: rejected")
    text = clean_text(value["text"])
    if not text:
        raise _Skip("empty transcript")
    if not normalize(text):
        raise _Skip(f"transcript empty after the '{options['language']}' normaliser: {text!r}")
    rate, low, high = options["sample_rate"], options["min_duration"], options["max_duration"]
    path = audio_dir / f"{utt_id}.flac"
    seconds = complete_flac(path, rate)  # absent, broken or cut short: decode again
    signal = None
    if seconds is None:
        signal = _decode(value["audio"], rate)
        seconds = len(signal) / rate
    if low is not None and seconds < low:
        raise _Skip(f"shorter than min_duration ({seconds:.2f} s < {low} s)")
    if high is not None and seconds > high:
        raise _Skip(f"longer than max_duration ({seconds:.2f} s > {high} s)")
    if signal is not None:
        write_flac(path, signal, rate)
    return {"ID": utt_id, "duration": f"{seconds:.3f}", "wav": str(path.resolve()),
            "spk_id": label(value.get("speaker")) or UNKNOWN, "wrd": text,
            "dialect": dialect_group(value.get("dialect"), value.get("country_birth")),
            "gender": gender_label(value.get("gender")), "age_group": age_group(value.get("age"))}


def _safe_id(raw):
    """A filename-safe utterance id (characters outside ``A-Za-z0-9._-`` become ``_``)."""
    return _UNSAFE.sub("_", str(raw)).strip("._") if raw is not None else ""


def _audio_dir(save_folder, split, source, stamp):
    """``audio/<split>/``, emptied first when its FLACs came from other shards (a newer revision
    downloaded into data_folder: the same IDs with other audio). Its ``shards.json`` (else, from
    before it existed, the split's stamp) records which shards; FLACs by ID are reused only then."""
    audio_dir = save_folder / "audio" / split
    record = audio_dir / "shards.json"
    made_from = read_stamp(record) or (read_stamp(stamp) or {}).get("shards")
    if audio_dir.is_dir() and made_from != source["shards"]:
        logger.info("CoRal %s: the shards changed; decoding the audio again", split)
        shutil.rmtree(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(audio_dir)  # of killed runs, not of another live one
    write_stamp(record, source["shards"])
    return audio_dir


def _utterance_job(job):
    """``(row, None)`` or ``(None, reason)`` for one ``(value, utt_id, audio_dir, options)``: the
    unit of work a preparation worker process decodes and writes."""
    value, utt_id, audio_dir, options = job
    try:
        return _utterance(value, utt_id, audio_dir, get_normalizer(options["language"]),
                          options), None
    except _Skip as reason:
        return None, _SPACES.sub(" ", str(reason))


def _split_rows(shards, split, audio_dir, options, num_workers=1):
    """Manifest rows of one split, and the skipped rows ``[id, shard, row, reason]``. With
    ``num_workers`` > 1 the rows are decoded in that many processes, a window of rows at a time
    (memory stays a few batches of audio), in shard order."""
    rows, skipped, first_seen, absent, window = [], [], {}, set(), []

    def flush(pool):
        jobs = [job for job, _ in window if job is not None]
        results = iter(pool.map(_utterance_job, jobs) if pool else map(_utterance_job, jobs))
        for job, (utt_id, shard_name, number) in window:  # in shard order, skips included
            row, reason = next(results) if job is not None else (None, "empty id")
            if reason is None:
                rows.append(row)
            else:
                skipped.append([utt_id, shard_name, number, reason])
        window.clear()

    with worker_pool(num_workers) as pool:
        for shard in shards:
            columns = shard_columns(shard)
            absent.update(f for f in OPTIONAL if f not in columns)
            batches = pq.ParquetFile(shard).iter_batches(
                batch_size=BATCH_ROWS, columns=list(dict.fromkeys(columns.values())))
            for number, record in enumerate(r for batch in batches for r in batch.to_pylist()):
                value = {field: record.get(column) for field, column in columns.items()}
                utt_id, where = _safe_id(value["id"]), f"{shard.name} row {number}"
                if not utt_id:
                    window.append((None, (value["id"], shard.name, number)))
                    continue
                if utt_id in first_seen:
                    raise ValueError(
                        f"CoRal {split}: id {utt_id!r} (from {value['id']!r}) appears twice: "
                        f"{first_seen[utt_id]} and {where} (under {shard.parent}). Fix: remove "
                        "the second copy of the shard or row; ids must be unique within a split.")
                first_seen[utt_id] = where
                window.append(((value, utt_id, audio_dir, options), (utt_id, shard.name, number)))
                if len(window) >= BATCH_ROWS * max(1, num_workers):
                    flush(pool)
        flush(pool)
    if absent:
        logger.warning("CoRal %s: no %s column(s) in the shards; those fields are '%s'",
                       split, sorted(absent), UNKNOWN)
    return rows, skipped


def prepare_coral(data_folder, save_folder, language="da", subset="read_aloud", splits=SPLITS,
                  sample_rate=16000, min_duration=None, max_duration=None, skip_existing=True,
                  num_workers=1):
    """Decode CoRal's parquet shards to FLAC files and write one manifest per split.

    Parameters
    ----------
    data_folder : str or Path
        A snapshot of the dataset repo (``huggingface-cli download alexandrainst/coral
        --repo-type dataset --local-dir DATA_FOLDER``), holding ``<subset>/<split>-*.parquet``
        or ``<subset>/<split>/*.parquet``.
    save_folder : str or Path
        Where ``<split>.csv``, ``skipped_<split>.tsv`` and ``audio/<split>/<ID>.flac`` go.
    language : str
        Normaliser (``speechtune.text``) that decides whether a transcript has any words.
    subset : str
        ``read_aloud`` or ``conversation``.
    splits : sequence of str
        Any of ``train``, ``val``, ``test``.
    sample_rate : int
        Rate of the written FLAC files (mono, 16-bit).
    min_duration, max_duration : float or None
        Skip utterances shorter/longer than this many seconds (None: no bound).
    skip_existing : bool
        Keep a split's CSV if it was written with the same options into the same (not moved)
        save folder and, where the shards are still there, from the same shards (names and
        sizes); else prepare it again. Complete FLACs at ``sample_rate`` decoded from the same
        shards are reused (an interrupted or moved preparation resumes); when the shards changed
        (another revision downloaded), ``audio/<split>/`` is emptied and decoded again.
    num_workers : int
        Processes decoding the audio and writing the FLACs (1: this process).

    Returns
    -------
    dict mapping split name to CSV path. Each CSV has columns ``ID, duration, wav, spk_id, wrd,
    dialect, gender, age_group``: ``ID`` the row's ``id_recording`` (``id_conversation`` in the
    conversation subset) made filename-safe, ``duration`` seconds of the decoded audio, ``wav``
    the absolute path of ``audio/<split>/<ID>.flac``, ``spk_id`` the ``id_speaker``, ``wrd`` the
    transcript as written (NFC, whitespace collapsed; the recipe normalises), ``dialect`` one of
    CoRal's 9 dialect groups or ``Non-native``, ``gender`` as given, ``age_group`` ``0-24``,
    ``25-49`` or ``50+``; missing metadata is ``unknown``. Rows that cannot be used (empty or
    word-less transcript, missing or undecodable audio, ``validated == rejected``, outside the
    duration bounds) are listed in ``skipped_<split>.tsv`` (``id, shard, row, reason``; rows
    counted from 0 in each shard) and counted in a logged warning.
    """
    if subset not in SUBSETS:
        raise ValueError(f"Unknown CoRal subset '{subset}'; choose from {SUBSETS}")
    get_normalizer(language)  # an unknown language fails before any decoding
    data_folder, save_folder = Path(data_folder), Path(save_folder)
    options = {"subset": subset, "language": language, "sample_rate": int(sample_rate),
               "min_duration": min_duration, "max_duration": max_duration}
    out = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"Unknown CoRal split '{split}'; choose from {SPLITS}")
        csv_path = save_folder / f"{split}.csv"
        stamp = save_folder / f"{split}.csv.source.json"
        out[split] = str(csv_path)
        try:
            shards = find_shards(data_folder, subset, split)
        except FileNotFoundError:
            shards = None
        # the CSV holds the FLACs' absolute paths: a moved save folder prepares again
        source = {"options": options, "save_folder": str(save_folder.resolve()),
                  "shards": [[p.name, p.stat().st_size] for p in shards or []]}
        done = read_stamp(stamp) or {}  # unreadable (cut short by a crash): prepare again
        keys = ["options", "save_folder"] + (["shards"] if shards is not None else [])
        if skip_existing and csv_path.is_file() and all(done.get(k) == source[k] for k in keys):
            logger.info("%s is up to date, keeping it", csv_path)
            continue
        if shards is None:
            find_shards(data_folder, subset, split)  # raises, naming the folder and the fix
        audio_dir = _audio_dir(save_folder, split, source, stamp)
        rows, skipped = _split_rows(shards, split, audio_dir, options, num_workers)
        report = save_folder / f"skipped_{split}.tsv"
        write_tsv(report, ["id", "shard", "row", "reason"], skipped)
        if skipped:
            logger.warning("CoRal %s: skipped %d of %d rows; see %s", split, len(skipped),
                           len(rows) + len(skipped), report)
        if not rows:
            raise ValueError(f"CoRal {split}: no usable rows in {len(shards)} shard(s) under "
                             f"{shards[0].parent} ({len(skipped)} skipped; reasons in {report}).")
        write_manifest(csv_path, rows, COLUMNS)
        write_stamp(stamp, source)
        logger.info("wrote %s (%d utterances)", csv_path, len(rows))
    return out


def prepare_coral_recipe(hparams):
    """A recipe's manifests (``Manifests``: ``train.csv``, ``val.csv`` as valid, ``test.csv`` as
    ``tests={"test": ...}`` in ``manifest_folder``), all whole: the recipe drops training
    utterances outside its ``min_duration``/``max_duration`` itself, so the prepared folder
    (manifests and extracted audio) is the same for every recipe and run that points
    ``manifest_folder`` at it: the shards are decoded once. ``hparams``: ``data_folder`` (the
    snapshot), ``manifest_folder``, ``language``, ``coral_subset``, ``sample_rate`` and
    ``prepare_workers``."""
    csvs = prepare_coral(hparams["data_folder"], hparams["manifest_folder"],
                         language=hparams["language"], subset=hparams["coral_subset"],
                         sample_rate=hparams["sample_rate"],
                         num_workers=hparams["prepare_workers"])
    return Manifests(train=csvs["train"], valid=csvs["val"], tests={"test": csvs["test"]})
