"""Test helpers shared by the test modules: the micro model configs, fake corpus trees
(CommonVoice, CoRal, LibriSpeech) made from the bundled audio, an in-process CTC experiment, and a
recipe runner. Fixtures are in ``tests/conftest.py``."""

import csv
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC = REPO / "recipes" / "Synthetic" / "data"

# A micro WavLM for tests: same 320x CNN arithmetic as WavLM-Large, a few thousand parameters.
MICRO_ENCODER = {
    "model_type": "wavlm",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 4,
    "mask_time_prob": 0.0,
    "vocab_size": 32,
}


# A micro Whisper for tests: Whisper's tokenizer layout and prefix, a 4 s window, one layer each.
MICRO_WHISPER = {
    "multilingual": True, "bpe_vocab_size": 300, "chunk_length": 4, "num_mel_bins": 80,
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "max_target_positions": 64, "init_std": 0.05,
}


# wav2vec2-large-960h's vocabulary in its id order: <pad> (the CTC blank), <s>, </s>, <unk>, the
# word delimiter |, then upper-case letters by frequency and the apostrophe
VOCAB_960H = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]


# CoRal's read-aloud schema (build_coral_asr.py; a subset of its recording/validation columns)
def coral_schema():
    import pyarrow as pa

    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("id_recording", pa.string()), ("id_sentence", pa.string()),
                      ("id_speaker", pa.string()), ("text", pa.string()),
                      ("location", pa.string()), ("age", pa.int64()), ("gender", pa.string()),
                      ("dialect", pa.string()), ("country_birth", pa.string()),
                      ("validated", pa.string()), ("audio", audio), ("asr_cer", pa.float64())])


def write_parquet(path, records, schema):
    """One parquet shard of ``records`` (dicts) with ``schema``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


def make_coral_snapshot(root, counts):
    """A CoRal snapshot in the hub's layout (``read_aloud/<split>-0000i-of-0000n.parquet``, train
    in two shards) from the first ``counts[split]`` bundled Danish utterances of the matching
    split (val <- valid): WAV bytes, speakers, two dialects, ages and genders."""
    dialects, ages = ("fynsk", "sønderjysk"), (22, 37, 61)
    for split, n in counts.items():
        with open(SYNTHETIC / "da" / f"{'valid' if split == 'val' else split}.csv",
                  newline="", encoding="utf-8") as f:
            rows = [r for _, r in zip(range(n), csv.DictReader(f), strict=False)]
        records = [{
            "id_recording": f"rec_{split}_{i:04d}", "id_sentence": f"sen_{i}",
            "id_speaker": r["spk_id"], "text": r["wrd"].capitalize() + ".", "location": "x",
            "age": ages[i % 3], "gender": r["gender"], "dialect": dialects[i % 2],
            "country_birth": "DK", "validated": "approved", "asr_cer": 0.0,
            "audio": {"bytes": (SYNTHETIC / r["wav"].replace("$data_root/", "")).read_bytes(),
                      "path": f"rec_{split}_{i:04d}.flac"},
        } for i, r in enumerate(rows)]
        shards = [records[: n // 2], records[n // 2:]] if split == "train" else [records]
        for k, shard in enumerate(shards):
            write_parquet(root / "read_aloud" / f"{split}-{k:05d}-of-{len(shards):05d}.parquet",
                          shard, coral_schema())
    return root


CV_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
             "down_votes", "age", "gender", "accents", "variant", "locale", "segment"]


def make_commonvoice_release(root, language, counts):
    """A CommonVoice locale folder in a release's layout (``train.tsv``, ``dev.tsv``,
    ``test.tsv``, ``validated.tsv``, ``clips/*.mp3`` at 48 kHz) from the first ``counts[split]``
    bundled utterances of ``language`` (dev <- valid); sentences capitalised with a full stop,
    speakers as client ids, CommonVoice's gender and age values."""
    import soundfile as sf
    import torch
    import torchaudio

    folder = root / f"cv-corpus-99.0/{language}"
    (folder / "clips").mkdir(parents=True)
    genders = {"male": "male_masculine", "female": "female_feminine"}
    lines = {}
    for split, n in counts.items():
        with open(SYNTHETIC / language / f"{'valid' if split == 'dev' else split}.csv",
                  newline="", encoding="utf-8") as f:
            rows = [r for _, r in zip(range(n), csv.DictReader(f), strict=False)]
        lines[split] = []
        for i, r in enumerate(rows):
            clip = f"common_voice_{language}_{split}_{i}.mp3"
            x, rate = sf.read(SYNTHETIC / r["wav"].replace("$data_root/", ""), dtype="float32")
            y = torchaudio.functional.resample(torch.from_numpy(x), rate, 48000).numpy()
            sf.write(folder / "clips" / clip, y, 48000, format="MP3")
            lines[split].append("\t".join([
                r["spk_id"], clip, f"s{split}{i}", r["wrd"].capitalize() + ".", "", "2", "0",
                ("twenties", "fifties")[i % 2], genders[r["gender"]], "", "", language, ""]))
    for name, split_lines in [*lines.items(), ("validated", sum(lines.values(), []))]:
        (folder / f"{name}.tsv").write_text(
            "\n".join(["\t".join(CV_HEADER), *split_lines]) + "\n", encoding="utf-8")
    return folder


CTC_YAML = REPO / "recipes" / "Synthetic" / "CTC" / "hparams" / "wavlm_tiny.yaml"


def experiment(data_dir, out, **overrides):
    """An in-process ``Experiment`` of the Synthetic CTC yaml with the micro encoder (built in
    ``out``), one epoch, no augmentation; ``overrides`` are yaml keys."""
    from speechtune.prepare.synthetic import prepare_synthetic
    from speechtune.recipe import build_experiment, load_yaml

    out.mkdir(parents=True, exist_ok=True)
    base = {
        "data_folder": str(data_dir), "output_folder": str(out),
        "model": "tiny:wavlm", "tiny_config": MICRO_ENCODER,
        "max_batch_seconds": 8, "number_of_epochs": 1, "augmenter": None, "min_duration": 0.0,
    }
    base.update(overrides)
    return build_experiment(load_yaml(CTC_YAML, base), {"device": "cpu"}, prepare_synthetic)


def write_subset(src_dir, dst_dir, counts):
    """Copy the first ``counts[split]`` rows of each bundled manifest, wav paths made absolute."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        with open(src_dir / f"{split}.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for _, r in zip(range(n), reader, strict=False)]
            fields = reader.fieldnames
        for r in rows:
            r["wav"] = r["wav"].replace("$data_root", str(SYNTHETIC))
        with open(dst_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return dst_dir


def run_recipe(recipe_dir, args, cwd=None, timeout=900):
    """Run a recipe's train.py in a subprocess (offline) and return the completed process."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd or recipe_dir, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def fake_librispeech(root, per_split=None):
    """<root>/<split>/<spk>/<chapter>/<spk>-<chapter>-<n>.flac + <spk>-<chapter>.trans.txt,
    made from bundled English audio, transcripts upper-case like the real corpus; as in the real
    corpus, no speaker (so no utterance ID) is in two splits: speakers 100-101 in the first
    split, 200-201 in the second, ..."""
    per_split = per_split or {"train-clean-100": ("train", 24), "dev-clean": ("valid", 6),
                              "test-clean": ("test", 6), "test-other": ("test", 4)}
    for k, (split, (src, n)) in enumerate(per_split.items()):
        rows = list(csv.DictReader(open(SYNTHETIC / "en" / f"{src}.csv", encoding="utf-8")))[:n]
        by_chapter = {}
        for i, row in enumerate(rows):
            spk, chapter = str(100 * (k + 1) + i % 2), str(7 + i % 2)
            d = root / split / spk / chapter
            d.mkdir(parents=True, exist_ok=True)
            utt = f"{spk}-{chapter}-{i:04d}"
            shutil.copy(row["wav"].replace("$data_root", str(SYNTHETIC)), d / f"{utt}.flac")
            by_chapter.setdefault(d / f"{spk}-{chapter}.trans.txt", []).append(
                f"{utt} {row['wrd'].upper()}")
        for path, lines in by_chapter.items():
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
