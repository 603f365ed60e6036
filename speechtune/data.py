"""Data side of every recipe: manifests -> SpeechBrain datasets, audio, vocabularies, batching.

Manifest contract (docs/design.md): CSV with ``ID,duration,wav,spk_id,wrd`` plus optional group
columns; ``wav`` may start with ``$data_root``; ``duration`` in seconds. A corpus preparation
returns its manifests as ``Manifests``.
"""

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import speechbrain as sb
import torch
import torchaudio
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.dataio.sampler import DynamicBatchSampler

from speechtune import buckets

REQUIRED_COLUMNS = ("ID", "duration", "wav", "spk_id", "wrd")


@dataclass
class Manifests:
    """What a corpus preparation returns: one CSV per split (several test sets allowed), and the
    language of each test set that is not in the run's ``language`` (a held-out English set of a
    Danish run is decoded and scored as English)."""

    train: str
    valid: str
    tests: dict[str, str] = field(default_factory=dict)
    languages: dict[str, str] = field(default_factory=dict)


def read_utf8(path) -> str:
    """A text file (a manifest) decoded as UTF-8, with or without the byte-order mark Excel and
    Notepad write (read as text it became part of the first column's name, ``\ufeffid``, and
    that column was lost). Any other encoding stops, naming the line and the byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        start = raw.rfind(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}, line {line}: byte 0x{raw[err.start]:02x} at column {err.start - start + 1} "
            "is not UTF-8 (the file is in another encoding, e.g. Windows-1252 or Latin-1). Fix: "
            "re-save it as UTF-8 (Excel: 'CSV UTF-8'; iconv -f cp1252 -t utf-8 FILE).") from None


def load_audio(path, sample_rate: int) -> torch.Tensor:
    """Read an audio file (a path or a file object) as a mono float32 tensor at
    ``sample_rate`` (mix down, resample)."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    sig = torch.from_numpy(data).mean(dim=1)
    if not torch.isfinite(sig).all():  # would give NaN features: a NaN loss or a silent wrong WER
        raise ValueError(f"{path}: the audio holds NaN or infinite samples; re-encode the file "
                         "(16-bit PCM or FLAC) or remove its row from the manifest")
    if sr != sample_rate and sig.numel():
        sig = torchaudio.functional.resample(sig, sr, sample_rate)
    return sig


def read_manifest(path: str | Path, data_root: str) -> dict[str, dict]:
    """Read a manifest once: ``{ID: row}`` with ``$data_root`` resolved in ``wav`` and
    ``duration`` a float.

    The rows feed both the pre-flight checks and the ``DynamicItemDataset``, so the CSV is read
    one time. SpeechBrain's ``load_data_csv`` is not used: it expands ``$name`` in every field,
    so a transcript such as "it costs $5" stopped the run with a KeyError.
    """
    with io.StringIO(read_utf8(path), newline="") as f:  # newline="": quoted line breaks kept
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; a manifest needs "
                f"{list(REQUIRED_COLUMNS)} (plus optional group columns). Re-run the corpus "
                "preparation in local/."
            )
        rows, first = {}, 2
        for number, row in enumerate(reader, start=1):
            # the file's lines, which a quoted line break in a transcript makes differ from rows
            line, first = (f"row {number} (line {first})" if reader.line_num == first else
                           f"row {number} (lines {first}-{reader.line_num})"), reader.line_num + 1
            utt_id = row["ID"]
            if utt_id in rows:
                raise ValueError(f"{path}, {line}: duplicate ID {utt_id!r}; IDs must be "
                                 "unique (re-run the corpus preparation)")
            try:
                row["duration"] = float(row["duration"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, {line}: duration {row['duration']!r} of "
                                 f"{utt_id!r} is not a number of seconds") from None
            row["wav"] = row["wav"].replace("$data_root", str(data_root))
            rows[utt_id] = row
    return rows


def write_manifest(path, rows, header, only_if_changed=False) -> Path:
    """Write manifest ``rows`` (dicts) as a CSV with columns ``header``, atomically: an
    interrupted write never leaves a manifest that looks finished. ``only_if_changed``: leave a
    file that already holds exactly this text alone (a preparation that every DDP process runs
    again then writes nothing)."""
    path = Path(path)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(header))
    writer.writeheader()
    writer.writerows(rows)
    content = text.getvalue().encode("utf-8")
    if only_if_changed and path.is_file() and path.read_bytes() == content:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
    return path


def make_dataset(rows: dict[str, dict], sort_by_duration: bool):
    """A ``DynamicItemDataset`` over manifest rows, in manifest or ascending-duration order."""
    dataset = sb.dataio.dataset.DynamicItemDataset(rows)
    return dataset.filtered_sorted(sort_key="duration") if sort_by_duration else dataset


def add_audio_pipeline(datasets, sample_rate):
    """Attach ``sig``: the utterance's audio, mono at ``sample_rate``."""

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav, sample_rate)

    sb.dataio.dataset.add_dynamic_item(datasets, audio_pipeline)


def build_char_vocab(train_texts, path, blank="<blank>", unk="<unk>") -> CTCTextEncoder:
    """Character vocabulary from (normalised) training text; saved to / reloaded from ``path``.

    Index 0 is the CTC blank, index 1 the unknown character; the rest are sorted characters.
    """
    encoder = CTCTextEncoder()
    path = Path(path)
    if path.exists():
        encoder.load(path)
        return encoder
    encoder.insert_blank(blank, index=0)
    encoder.add_unk(unk)
    encoder.update_from_iterable(sorted({c for text in train_texts for c in text}))
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder.save(path)
    return encoder


def pretrained_char_vocab(labels, blank_id, word_delimiter, unk, path) -> CTCTextEncoder:
    """A pretrained CTC model's own vocabulary (``labels`` in id order) as a ``CTCTextEncoder``.

    The model's padding token (its CTC blank, at ``blank_id``) becomes ``<blank>`` and its word
    delimiter (``|``) the space, so targets, decoding and export treat it like a vocabulary built
    here; every id keeps its index, so the pretrained head's rows still mean the same characters.
    Saved to ``path``; a file already there (an earlier start of the run) must hold exactly these
    labels: one written for another vocabulary would misalign the head's rows.
    """
    mapped = ["<blank>" if i == blank_id else " " if label == word_delimiter else label
              for i, label in enumerate(labels)]
    path = Path(path)
    if path.exists():
        encoder = CTCTextEncoder.from_saved(path)
        if [encoder.ind2lab.get(i) for i in range(len(encoder.ind2lab))] != mapped:
            raise ValueError(f"{path} was written for another vocabulary than this model's (an "
                             "earlier run in this output folder): use another --output_folder, "
                             "or delete it")
        return encoder
    encoder = CTCTextEncoder()
    for index, label in enumerate(mapped):
        if index == blank_id:
            encoder.insert_blank(label, index=index)
        elif label == unk:
            encoder.add_unk(label)
        else:
            encoder.add_label(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder.save(path)
    return encoder


def dynamic_batch_sampler(dataset, max_batch_seconds, num_buckets, shuffle, seed, max_batch_ex,
                          bucket_ratio=None):
    """SpeechBrain's duration-budget sampler: each batch holds at most ``max_batch_seconds``;
    with ``bucket_ratio``, counted at the padded length (``speechtune.buckets``: the ladder's
    rungs are its buckets), else in ``num_buckets`` buckets SpeechBrain places."""
    return DynamicBatchSampler(
        dataset,
        max_batch_length=max_batch_seconds,
        **bucketing([float(dataset.data[i]["duration"]) for i in dataset.data_ids]
                    if bucket_ratio else [], num_buckets, bucket_ratio),
        length_func=lambda x: x["duration"],
        shuffle=shuffle,
        batch_ordering="random" if shuffle else "ascending",
        max_batch_ex=max_batch_ex,
        seed=seed,
    )


def bucketing(durations, num_buckets, bucket_ratio):
    """``DynamicBatchSampler``'s bucket arguments: ``bucket_ratio``'s ladder from the shortest
    to the longest of ``durations`` (``speechtune.buckets.boundaries``), else ``num_buckets``."""
    if bucket_ratio is None or not durations:
        return {"num_buckets": num_buckets}
    return {"num_buckets": None, "bucket_boundaries": buckets.boundaries(
        max(durations), bucket_ratio, shortest=min(durations))}
