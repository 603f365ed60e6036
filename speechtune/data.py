"""Data side of every recipe: manifests -> SpeechBrain datasets, audio, vocabularies, batching.

Manifest contract (DESIGN.md): CSV with ``ID,duration,wav,spk_id,wrd`` plus optional group columns;
``wav`` may start with ``$data_root``; ``duration`` in seconds.
"""

import csv
from pathlib import Path

import soundfile as sf
import speechbrain as sb
import torch
import torchaudio
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.dataio.sampler import DynamicBatchSampler

REQUIRED_COLUMNS = ("ID", "duration", "wav", "spk_id", "wrd")


def load_audio(path: str, sample_rate: int) -> torch.Tensor:
    """Read an audio file as a mono float32 tensor at ``sample_rate`` (mix down, resample)."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    sig = torch.from_numpy(data).mean(dim=1)
    if sr != sample_rate:
        sig = torchaudio.functional.resample(sig, sr, sample_rate)
    return sig


def read_manifest(path: str | Path, data_root: str) -> list[dict]:
    """Read a manifest CSV, check its columns and resolve ``$data_root`` in ``wav``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; a manifest needs {list(REQUIRED_COLUMNS)} "
                "(plus optional group columns). Re-run the corpus preparation in local/."
            )
        rows = list(reader)
    for row in rows:
        row["wav"] = row["wav"].replace("$data_root", str(data_root))
    return rows


def load_split(csv_path, data_root, min_duration=None, max_duration=None, sort=None):
    """Load one manifest as a ``DynamicItemDataset``, duration-filtered and optionally sorted."""
    data = sb.dataio.dataset.DynamicItemDataset.from_csv(
        csv_path=str(csv_path), replacements={"data_root": str(data_root)}
    )
    limits_min = {"duration": min_duration} if min_duration is not None else {}
    limits_max = {"duration": max_duration} if max_duration is not None else {}
    return data.filtered_sorted(
        key_min_value=limits_min, key_max_value=limits_max, sort_key=sort
    )


def add_pipelines(datasets, normalize, tokenizer, sample_rate):
    """Attach ``sig`` (audio), ``words`` (normalised text) and ``tokens`` (character ids)."""

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav, sample_rate)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("words", "tokens")
    def text_pipeline(wrd):
        words = normalize(wrd)
        yield words
        yield torch.LongTensor(tokenizer.encode_sequence(list(words)))

    sb.dataio.dataset.add_dynamic_item(datasets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.set_output_keys(datasets, ["id", "sig", "words", "tokens", "duration"])


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


def dynamic_batch_sampler(dataset, max_batch_seconds, num_buckets, shuffle, seed, max_batch_ex):
    """SpeechBrain's duration-budget sampler: each batch holds at most ``max_batch_seconds``."""
    return DynamicBatchSampler(
        dataset,
        max_batch_length=max_batch_seconds,
        num_buckets=num_buckets,
        length_func=lambda x: x["duration"],
        shuffle=shuffle,
        batch_ordering="random" if shuffle else "ascending",
        max_batch_ex=max_batch_ex,
        seed=seed,
    )
