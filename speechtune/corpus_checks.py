"""Checks that need every audio file decoded once, and the checks across splits.

- **Leakage**: training utterances that are also in a valid/test split (the same ID, the same
  file after resolving links and ``..``, or the same samples under another name), and valid
  utterances that are also in a test split, inflate the score the run reports and the
  checkpoint it picks. Shared *transcripts* are reported as a warning only: a read-speech
  corpus may have several speakers read one sentence on purpose.
- **Degenerate training audio**: digital silence or a near-silent recording, heavily clipped
  speech, and constant signals (a tone, a DC offset) under a normal transcript teach the model
  to write words for no speech.
- **Duration limits**: training rows outside ``min_duration``/``max_duration`` are listed, and
  durations that look like milliseconds (the column is in seconds) are named as such.

``audio_stats`` decodes a file once for both: a hash of its samples (16-bit, mono, with the
sample rate) and three measures, each against a yaml threshold:

- ``level_dbfs``: the 95th percentile of 25 ms frame RMS, in dB below full scale, after the
  file's DC offset is removed: the level of the loud part of the file, so leading and trailing
  silence do not lower it (bundled speech: -26 to -18 dBFS; digital silence or a constant DC
  signal: -200);
- ``clipped``: the share of samples at full scale (|x| >= 0.999; bundled speech: 0; speech
  amplified 10x and clipped: 7%);
- ``flatness_db``: the median spectral flatness, between 50 Hz and 4 kHz, of the frames above a
  tenth of that level, in dB (a pure tone: about -85; two tones or mains hum with harmonics:
  -70 to -78; bundled speech: -21 to -10, also when upsampled to 48 kHz or band-limited to a
  telephone's 3.4 kHz; white noise: -2.5). The band keeps audio resampled from a lower rate
  (empty above its old Nyquist frequency) from looking tonal.

The results are cached in ``audio_checks.tsv`` (``cache_path``: beside the training manifest)
keyed by path, size and modification time, so a resumed run, or another run on the same corpus,
decodes only new or changed files.
"""

import csv
import hashlib
import logging
import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

logger = logging.getLogger(__name__)
FRAME_SECONDS = 0.025  # frames of 25 ms every 10 ms, at the file's own rate
BAND = (50.0, 4000.0)  # Hz: the flatness band, which any speech recording fills (telephone too)
FULL_SCALE = 0.999
MIN_SHARED_WORDS = 4  # shorter shared transcripts ("yes", "thank you") are not reported


@dataclass(frozen=True)
class AudioStats:
    content: str  # hash of the 16-bit mono samples and the sample rate
    level_dbfs: float
    clipped: float
    flatness_db: float  # NaN when no frame is above the floor (silence)


@dataclass(frozen=True)
class DegenerateLimits:
    """Thresholds of the degenerate-audio check (yaml ``preflight_min_level_dbfs``,
    ``preflight_max_clipped``, ``preflight_min_flatness_db``)."""

    min_level_dbfs: float = -60.0
    max_clipped: float = 0.01
    min_flatness_db: float = -50.0


def audio_stats(path) -> AudioStats:
    """Decode ``path`` once: its content hash and level, clipping and flatness (module doc)."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    x = data.mean(axis=1)
    digest = hashlib.blake2b(np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes(),
                             digest_size=16)
    digest.update(str(rate).encode())
    if not x.size:
        return AudioStats(digest.hexdigest(), -200.0, 0.0, math.nan)
    clipped = float(np.mean(np.abs(x) >= FULL_SCALE))
    x = x.astype(np.float64) - x.mean()  # a DC offset carries no sound
    frame = max(16, round(FRAME_SECONDS * rate))
    padded = np.pad(x, (0, max(0, frame - x.size)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::max(1, frame * 2 // 5)]
    rms = np.sqrt(np.mean(frames ** 2, axis=1))
    loud = float(np.percentile(rms, 95))
    active = frames[rms > max(1e-4, 0.1 * loud)]
    flatness = math.nan
    band = (np.fft.rfftfreq(frame, 1 / rate) >= BAND[0]) & \
        (np.fft.rfftfreq(frame, 1 / rate) <= min(BAND[1], rate / 2))
    if len(active) and band.sum() > 1:
        power = np.abs(np.fft.rfft(active * np.hanning(frame), axis=1))[:, band] ** 2 + 1e-12
        flat = np.exp(np.mean(np.log(power), axis=1)) / np.mean(power, axis=1)
        flatness = float(10 * np.log10(np.median(flat)))
    return AudioStats(digest.hexdigest(), float(20 * np.log10(loud + 1e-10)), clipped,
                      flatness)


def cache_path(train_manifest, output_folder):
    """Where the audio statistics are cached by default: ``audio_checks.tsv`` beside the
    training manifest, so every run on a corpus shares them, or in the output folder when the
    manifest's folder is not writable."""
    folder = Path(train_manifest).resolve().parent
    return (folder if os.access(folder, os.W_OK) else Path(output_folder)) / "audio_checks.tsv"


def _file_key(path):
    stat = os.stat(path)
    return str(Path(path).resolve()), str(stat.st_size), str(stat.st_mtime_ns)


def collect_stats(paths, cache_path, workers=1) -> dict[str, AudioStats]:
    """``{path: AudioStats}`` of readable ``paths``, from ``cache_path`` where the file is
    unchanged (same resolved path, size and mtime), else decoded (``workers`` threads) and
    the cache rewritten whole (a temporary file, then renamed). Files that cannot be read are
    left out: the pre-flight's audio check names them."""
    cached = {}
    cache_path = Path(cache_path)
    if cache_path.is_file():
        with open(cache_path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                cached[row["path"], row["size"], row["mtime_ns"]] = AudioStats(
                    row["content"], float(row["level_dbfs"]), float(row["clipped"]),
                    float(row["flatness_db"]))
    keys = {}
    for path in dict.fromkeys(paths):
        try:
            keys[path] = _file_key(path)
        except OSError:
            continue
    todo = [p for p, key in keys.items() if key not in cached]

    def measure(path):
        try:
            return path, audio_stats(path)
        except Exception:  # soundfile raises several types for broken files
            return path, None

    measured = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for path, stats in pool.map(measure, todo):
            if stats is not None:
                cached[keys[path]] = stats
                measured += 1
    if measured:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["path", "size", "mtime_ns", "content", "level_dbfs", "clipped",
                             "flatness_db"])
            for key, s in sorted(cached.items()):
                writer.writerow([*key, s.content, s.level_dbfs, s.clipped, s.flatness_db])
        os.replace(tmp, cache_path)
    return {p: cached[key] for p, key in keys.items() if key in cached}


def degenerate(stats: AudioStats, limits: DegenerateLimits):
    """``(problem kind, detail)`` of a degenerate recording, or None."""
    if stats.level_dbfs < limits.min_level_dbfs:
        return "silent_audio", (f"loudest frames at {stats.level_dbfs:.1f} dBFS, below "
                                f"{limits.min_level_dbfs:g} (preflight_min_level_dbfs)")
    if stats.flatness_db < limits.min_flatness_db:  # first: a full-scale tone is a tone
        return "tonal_audio", (f"spectral flatness {stats.flatness_db:.1f} dB, below "
                               f"{limits.min_flatness_db:g} (preflight_min_flatness_db)")
    if stats.clipped > limits.max_clipped:
        return "clipped_audio", (f"{stats.clipped:.1%} of samples at full scale, above "
                                 f"{limits.max_clipped:.1%} (preflight_max_clipped)")
    return None


def leakage_pairs(splits):
    """The split pairs checked for leakage: train against every other split, then valid
    against every test split (a test set shared with valid was used to pick the checkpoint).
    Test splits are not checked against each other."""
    others = [s for s in splits if s != "train"]
    pairs = [("train", s) for s in others if "train" in splits]
    return pairs + [("valid", s) for s in others if s != "valid" and "valid" in splits]


def leakage(splits, content=None):
    """Utterances of one split found again in a later one (``leakage_pairs``).

    ``splits``: ``{split: rows}`` (``ID``, ``wav``); ``content``: ``{wav: content hash}`` or
    None (no content check). Returns ``[(split, ID, kind, detail)]``, the earlier split's
    utterance named (train before valid before test): ``shared_id``, ``shared_audio`` (the
    same file once resolved), ``same_audio`` (the same samples in another file).
    """
    resolved = {row["wav"]: os.path.realpath(row["wav"])  # once per file, for every pair
                for rows in splits.values() for row in rows}
    found = []
    for first, second in leakage_pairs(splits):
        ids = {r["ID"] for r in splits[second]}
        paths, hashes = defaultdict(list), defaultdict(list)
        for row in splits[second]:
            paths[resolved[row["wav"]]].append(row["ID"])
            if content and row["wav"] in content:
                hashes[content[row["wav"]]].append(row["ID"])
        for row in splits[first]:
            if row["ID"] in ids:
                found.append((first, row["ID"], "shared_id", f"also an ID in {second}"))
            elif resolved[row["wav"]] in paths:
                other = paths[resolved[row["wav"]]][0]
                found.append((first, row["ID"], "shared_audio",
                              f"the same file as {second}/{other}: {row['wav']}"))
            elif content and content.get(row["wav"]) in hashes:
                other = hashes[content[row["wav"]]][0]
                found.append((first, row["ID"], "same_audio",
                              f"the same samples as {second}/{other}"))
    return found


def shared_transcripts(splits):
    """Valid/test utterances whose normalised transcript (``words``, else ``target``; at least
    ``MIN_SHARED_WORDS`` words) is also a training transcript: ``[(split, ID, detail)]``."""
    def text(row):
        return row.get("words") or row["target"]

    train = defaultdict(list)
    for row in splits.get("train", ()):
        if len(text(row).split()) >= MIN_SHARED_WORDS:
            train[text(row)].append(row["ID"])
    found = []
    for split, rows in splits.items():
        for row in rows if split != "train" else ():
            same = train.get(text(row))
            if same:
                more = f" and {len(same) - 1} more" if len(same) > 1 else ""
                found.append((split, row["ID"], f"the transcript of train/{same[0]}{more}"))
    return found


# ------------------------------------------------------------------ duration limits
def looks_like_milliseconds(seconds, hi):
    """A duration too long to be seconds: a hundred times ``max_duration`` or over 1000 s."""
    return seconds > 100 * hi or seconds > 1000


def outside_limits(outside, lo, hi):
    """The ``outside_duration_limits`` problems, ``[(split, ID, kind, detail)]``, of training
    rows ``{ID: seconds}`` outside ``[lo, hi]``; a duration that looks like milliseconds says so
    in the report and the log."""
    ms = [i for i, d in outside.items() if looks_like_milliseconds(d, hi)]
    if ms:
        logger.warning("pre-flight: %d training duration(s) look like milliseconds, e.g. %s: "
                       "%g s; the manifest's duration column is in seconds (divide by 1000, or "
                       "drop the column to have durations read from the audio)", len(ms),
                       ms[0], outside[ms[0]])
    return [("train", i, "outside_duration_limits",
             f"{d:.3f} s, not within [{lo}, {hi}] s (min_duration, max_duration)"
             + ("; milliseconds?" if i in ms else "")) for i, d in sorted(outside.items())]


def all_outside_message(durations, lo, hi):
    """The message when every training row is outside the duration limits: the limits, the
    shortest and longest duration seen, and the likely cause when they look like
    milliseconds."""
    shortest, longest = min(durations), max(durations)
    hint = ("Durations look like milliseconds: the manifest's duration column is in seconds "
            "(divide by 1000, or drop the column to have durations read from the audio)."
            if looks_like_milliseconds(shortest, hi) else
            "Fix: check the manifest's duration column (seconds), or set min_duration / "
            "max_duration to include them.")
    return (f"Split 'train' is empty: every one of its {len(durations)} rows is outside the "
            f"duration limits [{lo:g}, {hi:g}] s (min_duration, max_duration); its durations "
            f"run from {shortest:g} to {longest:g} s. {hint}")
