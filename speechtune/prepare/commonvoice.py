"""CommonVoice: one locale folder of a release (``<locale>/*.tsv`` + ``clips/*.mp3``) -> CSVs.

The TSVs are read by column name (releases differ) and without quote handling (CommonVoice does
not quote); the sentence is kept as written (the recipe normalises it) and every clip left out
is listed, with its reason, in ``<save_folder>/skipped_<split>.tsv``. Audio is decoded and
resampled from the mp3 at every epoch (``resample="on_the_fly"``) or converted once to FLAC at
the model's rate (``"once"``); ``local/measure_audio_decoding.py`` measures what each costs.
"""

import logging
import os
import unicodedata
from collections import Counter
from pathlib import Path

import soundfile as sf

from speechtune.data import Manifests, load_audio, write_manifest
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

SPLITS = ("train", "dev", "test")
TRAIN_TSVS = ("train", "validated")
RESAMPLE = ("on_the_fly", "once")
REQUIRED = ("client_id", "path", "sentence")
VOTES = ("up_votes", "down_votes")
GROUPS = {"gender": ("gender",), "age": ("age",), "accents": ("accents", "accent")}  # old: accent
COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd", *GROUPS]
LAYOUT = ("data_folder must be the locale folder of an extracted CommonVoice release, e.g. "
          ".../cv-corpus-17.0/da (holding train.tsv, dev.tsv, test.tsv and clips/*.mp3)")


def read_tsv(path):
    """The rows of a CommonVoice TSV as dicts keyed by its header, and ``[(clip, reason)]`` for
    the lines that cannot be rows. Extra fields (tabs in the sentence) are joined back into it
    only when the columns after it then hold what they should (``_fits``): else (a trailing tab,
    one in another column) the line is skipped, as is one with fewer fields."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    header = lines[0].rstrip("\r").split("\t") if lines else []
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (header: {header}). Fix: give the "
                         f"TSVs of a CommonVoice release as extracted; {LAYOUT}.")
    where = {name: header.index(name) for name in REQUIRED}
    lines = [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(lines[1:], 2)
             if line.strip()]
    locales = Counter(fields[header.index("locale")].strip() for _, fields in lines
                      if "locale" in header and len(fields) == len(header))
    locale = locales.most_common(1)[0][0] if locales else None  # the other rows' locale
    rows, skipped, s = [], [], where["sentence"]
    for number, fields in lines:
        extra = len(fields) - len(header)
        clip = fields[where["path"]] if where["path"] < len(fields) else f"line {number}"
        if extra > 0:
            fields = [*fields[:s], " ".join(fields[s:s + extra + 1]), *fields[s + extra + 1:]]
        if extra < 0:
            skipped.append((clip, f"{path.name} line {number}: {len(fields)} fields, the header "
                                  f"has {len(header)}"))
        elif extra and not _fits(header, fields, s, locale):
            skipped.append((clip, f"{path.name} line {number}: {len(header) + extra} fields for "
                                  f"{len(header)} columns, cannot tell which hold the sentence"))
        else:
            rows.append(dict(zip(header, fields, strict=True)))
    return rows, skipped


def check_locale(rows, language, locale, tsv_name):
    """Stop when the TSV's ``locale`` column is not the expected locale: ``locale`` if given,
    else any whose language part is ``language`` (``sv-SE`` for ``sv``). Another locale's folder
    would otherwise train and score quietly on the wrong language's text normaliser and model
    language token."""
    found = Counter(r.get("locale", "").strip() for r in rows)
    found.pop("", None)
    if not found:
        return  # old releases have no locale column
    top = found.most_common(1)[0][0]
    if (top == locale) if locale else (top.split("-")[0].lower() == language.lower()):
        return
    raise ValueError(
        f"{tsv_name}.tsv holds clips of locale {top!r} but the run expects "
        f"{'locale ' + repr(locale) if locale else 'language ' + repr(language)}. Fix: point "
        f"data_folder at the right locale folder, or pass --language={top.split('-')[0]} (the "
        f"locale's language code). When {top!r} really is language {language!r} (for example "
        f"zh-HK for Cantonese, yue), pass --locale={top}.")


def _fits(header, fields, sentence, locale):
    """Whether the columns after the (rejoined) sentence hold what they should: vote counts
    numbers, ``locale`` the other rows' locale; False when none of them is there to tell."""
    checks = [(name, value.strip()) for name, value in
              zip(header[sentence + 1:], fields[sentence + 1:], strict=True)
              if name in VOTES or (name == "locale" and locale is not None)]
    return bool(checks) and all(value.isdigit() if name in VOTES else value == locale
                                for name, value in checks)


def read_clip_durations(folder):
    """``{clip file name: seconds}`` from ``clip_durations.tsv`` (milliseconds), or None."""
    path = Path(folder) / "clip_durations.tsv"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split("\t") if lines else []
    if "clip" not in header or not any(h.startswith("duration") for h in header):
        raise ValueError(f"{path}: expected columns clip and duration[ms], got {header}. Fix: "
                         "restore the file from the release or delete it (durations are then "
                         "read from the mp3 headers).")
    clip = header.index("clip")
    ms = next(i for i, h in enumerate(header) if h.startswith("duration"))
    rows = [line.split("\t") for line in lines[1:]]
    return {f[clip]: float(f[ms]) / 1000.0 for f in rows if len(f) == len(header) and f[ms].strip()}


def _clip_name(path):
    """The clip's file name (very old releases list it without the ``.mp3``)."""
    return path if Path(path).suffix else f"{path}.mp3"


def clean_rows(rows, normalize, tsv_name):
    """Contract fields of usable rows, and ``[(clip, reason)]`` for the others: ``wrd`` is the
    sentence NFC-composed with whitespace collapsed; a sentence that is empty or normalises to
    nothing (only punctuation) is skipped, as is a clip listed twice."""
    group_columns = {g: next((n for n in names if n in (rows[0] if rows else {})), None)
                     for g, names in GROUPS.items()}
    out, skipped, seen = [], [], set()
    for row in rows:
        clip = _clip_name(row["path"].strip()) if row["path"].strip() else "-"
        wrd = " ".join(unicodedata.normalize("NFC", row["sentence"]).split())
        reason = (f"empty path in {tsv_name}" if clip == "-" else
                  f"listed twice in {tsv_name}" if clip in seen else
                  "empty sentence" if not wrd else
                  f"sentence {wrd!r} is empty after text normalisation" if not normalize(wrd)
                  else None)
        if reason:
            skipped.append((clip, reason))
            continue
        seen.add(clip)
        groups = {g: (row[c].strip() if c else "") or "unknown" for g, c in group_columns.items()}
        speaker = row["client_id"].strip() or "unknown"
        out.append({"ID": Path(clip).stem, "clip": clip, "spk_id": speaker, "wrd": wrd, **groups})
    return out, skipped


def exclude_dev_test(rows, folder, normalize):
    """``validated.tsv`` rows whose speaker and sentence are in neither dev.tsv nor test.tsv,
    and ``[(clip, reason)]`` for the excluded ones (no speaker or sentence leaks into testing)."""
    speakers, sentences = set(), set()
    for name in ("dev", "test"):
        for row in read_tsv(_tsv(folder, name))[0]:
            speakers.add(row["client_id"].strip())
            sentences.add(normalize(row["sentence"]))
    sentences.discard("")
    leak = {r["clip"]: "speaker" if r["spk_id"] in speakers else "sentence" for r in rows
            if r["spk_id"] in speakers or normalize(r["wrd"]) in sentences}
    return ([r for r in rows if r["clip"] not in leak],
            [(r["clip"], f"{leak[r['clip']]} in dev.tsv or test.tsv") for r in rows
             if r["clip"] in leak])


def _info(path):
    """``(seconds, None)`` from the audio file's header, or ``(None, error)``."""
    try:
        info = sf.info(path)
    except Exception as err:  # soundfile raises several types for broken files
        return None, f"unreadable audio ({err})"
    if info.frames <= 0:
        return None, "audio has no samples"
    return info.frames / info.samplerate, None


def convert_clip(job):
    """Decode ``src``, resample it and write ``dst`` as 16-bit FLAC unless a complete ``dst``
    exists (a broken one is written again): ``(seconds, None)`` or ``(None, error)``. The write
    goes to ``<dst>.<pid>.tmp`` first: a killed conversion leaves no cut file that looks done."""
    src, dst, sample_rate = job
    seconds = complete_flac(dst, sample_rate)
    if seconds is not None:
        return seconds, None
    try:
        sig = load_audio(src, sample_rate).clamp_(-1.0, 1.0).numpy()
    except Exception as err:
        return None, f"cannot decode audio ({err})"
    if sig.size == 0:
        return None, "audio has no samples"
    write_flac(dst, sig, sample_rate)
    return _info(dst)


def _map(fn, jobs, num_workers):
    """``[fn(job)]``, in ``num_workers`` processes when more than one (each single-threaded)."""
    if num_workers <= 1 or len(jobs) < 2:
        return [fn(job) for job in jobs]
    chunk = max(1, min(256, len(jobs) // (num_workers * 16)))
    with worker_pool(num_workers) as pool:
        return pool.map(fn, jobs, chunksize=chunk)


def _split_by_result(rows, results):
    """Rows with ``duration`` set from ``(seconds, error)`` results, and the failed ones."""
    pairs = list(zip(rows, results, strict=True))
    return ([{**r, "duration": sec} for r, (sec, err) in pairs if not err],
            [(r["clip"], err) for r, (_, err) in pairs if err])


def _filter_duration(rows, lo, hi):
    """Rows within ``[lo, hi]`` seconds (None: no limit), and the others with the reason."""
    kept, skipped = [], []
    for r in rows:
        d = r["duration"]
        reason = (f"{d:.3f} s < min_duration {lo} s" if lo is not None and d < lo else
                  f"{d:.3f} s > max_duration {hi} s" if hi is not None and d > hi else None)
        if reason:
            skipped.append((r["clip"], reason))
        else:
            kept.append(r)
    return kept, skipped


def _tsv(folder, name):
    path = Path(folder) / f"{name}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {LAYOUT}.")
    return path


def _write_skipped(path, skipped, split):
    write_tsv(path, ["clip", "reason"], skipped)
    if skipped:
        logger.warning("CommonVoice %s: %d clip(s) skipped; clip and reason in %s", split,
                       len(skipped), path)


def _prepare_split(folder, save_folder, split, tsv_name, settings, num_workers):
    """Rows of one split, every skip written to ``skipped_<split>.tsv``; the manifest rows."""
    normalize = get_normalizer(settings["language"])
    rows, skipped = read_tsv(_tsv(folder, tsv_name))
    check_locale(rows, settings["language"], settings["locale"], tsv_name)
    rows, dropped = clean_rows(rows, normalize, f"{tsv_name}.tsv")
    skipped += dropped
    if tsv_name == "validated":
        rows, excluded = exclude_dev_test(rows, folder, normalize)
        skipped += excluded
        logger.info("CommonVoice %s: %d validated clip(s) excluded, their speaker or sentence "
                    "is in dev.tsv or test.tsv", split, len(excluded))
    present = set(os.listdir(folder / "clips"))
    skipped += [(r["clip"], "clip file not found in clips/") for r in rows
                if r["clip"] not in present]
    rows = [r for r in rows if r["clip"] in present]
    known = read_clip_durations(folder) or {}
    unknown = [r for r in rows if r["clip"] not in known]
    results = iter(_map(_info, [str(folder / "clips" / r["clip"]) for r in unknown], num_workers))
    rows, dropped = _split_by_result(
        rows, [(known[r["clip"]], None) if r["clip"] in known else next(results) for r in rows])
    skipped += dropped
    lo, hi = settings["min_duration"], settings["max_duration"]
    rows, dropped = _filter_duration(rows, lo, hi)
    skipped += dropped
    if settings["resample"] == "once":
        out_dir = save_folder / f"clips_{settings['sample_rate']}"
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)
        rows = [{**r, "wav": str((out_dir / f"{r['ID']}.flac").resolve())} for r in rows]
        jobs = [(str(folder / "clips" / r["clip"]), r["wav"], settings["sample_rate"])
                for r in rows]
        rows, dropped = _split_by_result(rows, _map(convert_clip, jobs, num_workers))
        skipped += dropped
        rows, dropped = _filter_duration(rows, lo, hi)  # again, on the decoded durations
        skipped += dropped
    else:
        rows = [{**r, "wav": f"$data_root/clips/{r['clip']}"} for r in rows]
    report = save_folder / f"skipped_{split}.tsv"
    _write_skipped(report, skipped, split)
    if not rows:
        raise ValueError(f"CommonVoice {split}: no usable clip in {folder / (tsv_name + '.tsv')}"
                         f" ({len(skipped)} skipped; reasons in {report}). Fix: check the "
                         f"reasons, the duration limits, and that clips/ holds the mp3 files.")
    return [{**{c: r[c] for c in COLUMNS}, "duration": f"{r['duration']:.3f}"} for r in rows]


def prepare_commonvoice(data_folder, save_folder, language, splits=SPLITS, train_tsv="train",
                        resample="on_the_fly", sample_rate=16000, min_duration=None,
                        max_duration=None, num_workers=1, skip_existing=True, locale=None):
    """Write one manifest per CommonVoice split.

    Parameters
    ----------
    data_folder : the locale folder of an extracted release, e.g. ``.../cv-corpus-17.0/da``:
        ``train.tsv``, ``dev.tsv``, ``test.tsv`` (``validated.tsv`` for ``train_tsv=
        "validated"``), ``clips/*.mp3`` and optionally ``clip_durations.tsv``.
    save_folder : where ``<split>.csv``, ``skipped_<split>.tsv`` and (``resample="once"``)
        ``clips_<sample_rate>/`` go.
    language : code of the locale; its normaliser (``speechtune.text``) decides which sentences
        have no text left (skipped). ``wrd`` itself is not normalised.
    splits : any of ``SPLITS``.
    train_tsv : ``"train"`` (train.tsv) or ``"validated"``: validated.tsv less every clip whose
        speaker (``client_id``) or sentence is in dev.tsv or test.tsv (no leak into testing).
    resample : ``"on_the_fly"``: ``wav`` points at the mp3 (decoded and resampled at every
        epoch); ``"once"``: each clip is decoded once and written as 16-bit FLAC at
        ``sample_rate`` (resumable: complete FLACs are kept, broken ones written again).
    sample_rate : the model's rate (Hz), for ``resample="once"``.
    min_duration, max_duration : seconds (None: no limit); clips outside are skipped.
    num_workers : processes reading mp3 headers (without ``clip_durations.tsv``) and converting.
    locale : the locale the TSVs' ``locale`` column must hold; None: any whose language part is
        ``language`` (``sv-SE`` for ``sv``). Another locale stops the preparation.
    skip_existing : keep a split's CSV made earlier with the same settings and, with ``once``,
        in the same save folder (``<split>.csv.source.json``; unreadable: prepared again); else
        rewrite it (a moved folder keeps its FLACs: they are reused).

    Returns
    -------
    dict mapping split name to CSV path. Columns ``ID,duration,wav,spk_id,wrd,gender,age,accents``:
    the clip's file stem, seconds (clip_durations.tsv, else the mp3 header; the FLAC's with
    ``once``), ``$data_root/clips/<clip>.mp3`` (``$data_root`` = ``data_folder``) or the absolute
    path of ``<save_folder>/clips_<sample_rate>/<ID>.flac``, the ``client_id``, the sentence as
    written (NFC, whitespace collapsed), the groups as in the TSV (empty: ``unknown``). Skipped
    clips: ``<save_folder>/skipped_<split>.tsv`` (``clip``, ``reason``).
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r}: choose from {RESAMPLE} ('on_the_fly' decodes "
                         "the mp3 at every epoch, 'once' converts the clips to FLAC first)")
    if train_tsv not in TRAIN_TSVS:
        raise ValueError(f"train_tsv={train_tsv!r}: choose from {TRAIN_TSVS} ('validated' is "
                         "validated.tsv less the dev/test speakers and sentences)")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown CommonVoice split(s) {unknown}; choose from {SPLITS}")
    get_normalizer(language)  # fails early, naming how to add a language
    folder, save_folder = Path(data_folder).expanduser(), Path(save_folder)
    if not folder.is_dir() or not (folder / "train.tsv").is_file():
        raise FileNotFoundError(f"{folder / 'train.tsv'} not found: {LAYOUT}.")
    if not (folder / "clips").is_dir():
        raise FileNotFoundError(f"{folder / 'clips'} not found: {LAYOUT}.")
    save_folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in splits:
        tsv_name = train_tsv if split == "train" else split
        csv_path = save_folder / f"{split}.csv"
        out[split] = str(csv_path)
        settings = {"data_folder": str(folder.resolve()), "tsv": f"{tsv_name}.tsv",
                    "language": language, "locale": locale, "resample": resample,
                    "sample_rate": sample_rate if resample == "once" else None,
                    "min_duration": min_duration, "max_duration": max_duration,
                    # the FLACs' absolute paths are in the CSV: a moved folder prepares again
                    "save_folder": str(save_folder.resolve()) if resample == "once" else None}
        stamp = csv_path.with_name(csv_path.name + ".source.json")
        if skip_existing and csv_path.is_file() and read_stamp(stamp) == settings:
            logger.info("%s exists, skipping preparation of %s", csv_path, split)
            continue
        rows = _prepare_split(folder, save_folder, split, tsv_name, settings, num_workers)
        write_manifest(csv_path, rows, COLUMNS)
        write_stamp(stamp, settings)
        logger.info("wrote %s (%d clips)", csv_path, len(rows))
    return out


def prepare_commonvoice_recipe(hparams):
    """A recipe's manifests (``Manifests``: train, dev as valid, ``tests={"test": ...}``), all
    whole: the recipe drops training clips outside its ``min_duration``/``max_duration`` itself,
    so one prepared folder (manifests and, with ``resample: once``, the FLAC copies) serves every
    recipe and run of a language that points ``manifest_folder`` at it. ``hparams``:
    ``data_folder`` (the locale folder), ``manifest_folder``, ``language``, ``train_tsv``,
    ``resample``, ``sample_rate``, ``prepare_workers`` and optionally ``locale`` (see
    ``prepare_commonvoice``)."""
    csvs = prepare_commonvoice(
        hparams["data_folder"], hparams["manifest_folder"], hparams["language"],
        train_tsv=hparams["train_tsv"], resample=hparams["resample"],
        sample_rate=hparams["sample_rate"], num_workers=hparams["prepare_workers"],
        locale=hparams.get("locale"))
    return Manifests(train=csvs["train"], valid=csvs["dev"], tests={"test": csvs["test"]})
