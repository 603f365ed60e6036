"""CoRal preparation on real parquet shards in the hub's layout and schema (offline, CPU)."""

import csv
import io
import logging
import os
import runpy
import sys
import unicodedata

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch
import torchaudio
from fakes import REPO, SYNTHETIC, coral_schema, write_parquet

from speechtune.data import Manifests
from speechtune.prepare import coral
from speechtune.prepare.coral import COLUMNS, prepare_coral
from speechtune.prepare.coral_groups import age_group, dialect_group

DA = SYNTHETIC / "da"
SCHEMA = coral_schema()
TOL = 2e-4  # 16-bit quantisation (3e-5) plus float rounding


def bundled(n, split="train"):
    """The first ``n`` bundled Danish utterances: (audio path, transcript, samples at 16 kHz)."""
    with open(DA / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f), strict=False)]
    out = []
    for r in rows:
        path = r["wav"].replace("$data_root", str(SYNTHETIC))
        samples, rate = sf.read(path, dtype="float32")
        assert rate == 16000
        out.append((path, r["wrd"], samples))
    return out


def wav_bytes(samples, rate):
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def upsample_48k(samples):
    return torchaudio.functional.resample(torch.from_numpy(samples), 16000, 48000).numpy()


def record(rec_id, text, audio, speaker="spk1", age=30, gender="female", dialect="fynsk",
           country="DK", validated="approved"):
    return {"id_recording": rec_id, "id_sentence": f"s_{rec_id}", "id_speaker": speaker,
            "text": text, "location": "Krystalgade 15", "age": age, "gender": gender,
            "dialect": dialect, "country_birth": country, "validated": validated,
            "audio": None if audio is False else {"bytes": audio, "path": f"{rec_id}.wav"},
            "asr_cer": 0.1}


def write_shard(path, records, schema=SCHEMA):
    write_parquet(path, records, schema)


def make_coral(root):
    """A snapshot: train in two shards (push_to_hub names), val in the parquet-converter layout,
    test with a fingerprinted name. Returns the expected samples of the kept train rows."""
    utts = bundled(8)
    (p0, t0, x0), (_, t1, x1), (_, t2, x2), (_, _, x3), (p4, t4, x4) = utts[:5]
    decomposed = unicodedata.normalize("NFD", "  Åse   spiser\n rugbrød  ")
    write_shard(root / "read_aloud" / "train-00000-of-00002.parquet", [
        record("rec_0001", t0[0].upper() + t0[1:] + ".", open(p0, "rb").read(), age=24,
               dialect="vendsysselsk (m. hanherred og læsø)"),
        record("rec/0002 x", t1, wav_bytes(upsample_48k(x1), 48000), speaker="spk2", age=25,
               gender="non-binary", dialect="Fynsk", country=None),
        record("rec_0003", t2, wav_bytes(np.stack([x2, 0.5 * x2], axis=1), 16000),
               speaker="spk3", age=50, gender="male", dialect="sønderjysk", country="SE"),
        record("rec_0004", "   ", open(p0, "rb").read()),
        record("rec_0005", "…?!", open(p0, "rb").read()),
    ])
    write_shard(root / "read_aloud" / "train-00001-of-00002.parquet", [
        record("rec_0006", t0, b"RIFF not really a wav file"),
        record("rec_0007", t0, False),
        record("rec_0008", t0, open(p0, "rb").read(), validated="rejected"),
        record("rec_0009", decomposed, wav_bytes(x3, 16000), speaker=None, age=None,
               gender=None, dialect=None, country=None),
        record("rec_0010", t4, open(p4, "rb").read()),
    ])
    evals = bundled(4, "valid")
    write_shard(root / "read_aloud" / "val" / "0000.parquet",
                [record(f"val_{i}", t, open(p, "rb").read()) for i, (p, t, _) in
                 enumerate(evals[:2])])
    write_shard(root / "read_aloud" / "test-00000-of-00001-0a1b2c3d4e5f6789.parquet",
                [record(f"test_{i}", t, open(p, "rb").read()) for i, (p, t, _) in
                 enumerate(evals[2:])])
    resampled = torchaudio.functional.resample(torch.from_numpy(upsample_48k(x1)), 48000, 16000)
    return {"rec_0001": x0, "rec_0002_x": resampled.numpy(), "rec_0003": 0.75 * x2,
            "rec_0009": x3, "rec_0010": x4, "source_0002": x1}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("coral")
    expected = make_coral(root / "snapshot")
    csvs = prepare_coral(root / "snapshot", root / "out")
    return root, expected, csvs


def test_manifest_rows_audio_and_text(prepared):
    root, expected, csvs = prepared
    assert set(csvs) == {"train", "val", "test"}
    rows = read_csv(csvs["train"])
    assert list(rows[0]) == COLUMNS
    assert [r["ID"] for r in rows] == ["rec_0001", "rec_0002_x", "rec_0003", "rec_0009",
                                      "rec_0010"]
    for row in rows:
        audio, rate = sf.read(row["wav"], dtype="float32")
        info = sf.info(row["wav"])
        assert (rate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "FLAC")
        assert row["wav"] == str(root / "out" / "audio" / "train" / f"{row['ID']}.flac")
        assert float(row["duration"]) == pytest.approx(len(audio) / 16000, abs=6e-4)
        want = expected[row["ID"]]
        assert len(audio) == len(want)
        np.testing.assert_allclose(audio, want, atol=TOL)
    # 48 kHz source: back at 16 kHz it is the bundled utterance again
    flac, _ = sf.read(rows[1]["wav"], dtype="float32")
    assert np.corrcoef(flac, expected["source_0002"])[0, 1] > 0.99
    assert rows[0]["wrd"] == "Børnene leger i sneen."  # as written: case and punctuation kept
    assert rows[3]["wrd"] == "Åse spiser rugbrød" and rows[3]["wrd"] == unicodedata.normalize(
        "NFC", rows[3]["wrd"])
    assert {r["spk_id"] for r in rows} == {"spk1", "spk2", "spk3", "unknown"}
    assert [r["ID"] for r in read_csv(csvs["val"])] == ["val_0", "val_1"]
    assert [r["ID"] for r in read_csv(csvs["test"])] == ["test_0", "test_1"]


def test_group_columns_and_age_bins(prepared):
    rows = {r["ID"]: r for r in read_csv(prepared[2]["train"])}
    groups = {i: (r["dialect"], r["gender"], r["age_group"]) for i, r in rows.items()}
    assert groups == {"rec_0001": ("Nordjysk", "female", "0-24"),
                      "rec_0002_x": ("Fynsk", "nonbinary", "25-49"),
                      "rec_0003": ("Non-native", "male", "50+"),
                      "rec_0009": ("unknown", "unknown", "unknown"),
                      "rec_0010": ("Fynsk", "female", "25-49")}
    assert [age_group(a) for a in ("26", 49, "49.0", -1, "n/a", None, 200)] == [
        "25-49", "25-49", "25-49", "unknown", "unknown", "unknown", "unknown"]
    assert dialect_group(" Amagermål ", "dk") == "Københavnsk"
    assert dialect_group("thybomål", None) == "Vestjysk"
    assert dialect_group("nyt mål", "DK") == "nyt mål"  # unmapped: kept as written


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_report_names_shard_row_and_reason(tmp_path, caplog, workers):
    make_coral(tmp_path / "snapshot")
    with caplog.at_level(logging.WARNING, logger="speechtune.prepare.coral"):
        prepare_coral(tmp_path / "snapshot", tmp_path / "out", splits=["train"],
                      num_workers=workers)
    with open(tmp_path / "out" / "skipped_train.tsv", newline="", encoding="utf-8") as f:
        report = list(csv.DictReader(f, delimiter="\t"))
    got = {(r["id"], r["shard"], r["row"]): r["reason"] for r in report}
    assert set(got) == {("rec_0004", "train-00000-of-00002.parquet", "3"),
                        ("rec_0005", "train-00000-of-00002.parquet", "4"),
                        ("rec_0006", "train-00001-of-00002.parquet", "0"),
                        ("rec_0007", "train-00001-of-00002.parquet", "1"),
                        ("rec_0008", "train-00001-of-00002.parquet", "2")}
    assert got[("rec_0004", "train-00000-of-00002.parquet", "3")] == "empty transcript"
    assert "after the 'da' normaliser" in got[("rec_0005", "train-00000-of-00002.parquet", "4")]
    assert got[("rec_0006", "train-00001-of-00002.parquet", "0")].startswith("audio undecodable")
    assert got[("rec_0007", "train-00001-of-00002.parquet", "1")] == "audio bytes missing"
    assert got[("rec_0008", "train-00001-of-00002.parquet", "2")] == "validated: rejected"
    assert "skipped 5 of 10 rows" in caplog.text and "skipped_train.tsv" in caplog.text
    assert not list((tmp_path / "out" / "audio" / "train").glob("rec_000[4-8]*"))


def test_rerun_keeps_outputs_and_resumes(tmp_path, monkeypatch):
    make_coral(tmp_path / "snapshot")
    args = (tmp_path / "snapshot", tmp_path / "out")
    csv_path = prepare_coral(*args, splits=["train"])["train"]
    flacs = sorted((tmp_path / "out" / "audio" / "train").glob("*.flac"))
    stamps = {p: p.stat().st_mtime_ns for p in [*flacs, tmp_path / "out" / "train.csv"]}
    decoded = []
    real_decode = coral._decode
    monkeypatch.setattr(coral, "_decode", lambda a, r: decoded.append(1) or real_decode(a, r))
    prepare_coral(*args, splits=["train"])  # up to date: nothing read
    assert decoded == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a killed run: one FLAC never renamed into place, a partial temporary file beside it
    lost = flacs[0]
    lost.rename(lost.with_name(lost.name + ".tmp"))
    lost.with_name(lost.name + ".tmp").write_bytes(b"half a file")
    prepare_coral(*args, splits=["train"], skip_existing=False)
    assert len(decoded) == 3  # the lost FLAC, and the two rows whose audio cannot be decoded
    assert sf.info(str(lost)).samplerate == 16000
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.suffix == ".flac"
               and p != lost)
    # changed options rewrite the manifest, even with skip_existing
    prepare_coral(*args, splits=["train"], max_duration=2.0)
    kept = read_csv(csv_path)
    assert kept and all(float(r["duration"]) <= 2.0 for r in kept) and len(kept) < 5



@pytest.mark.parametrize("workers", [1, 2])
def test_skips_and_rows_keep_shard_order_in_any_number_of_processes(tmp_path, workers):
    """An empty id is skipped where it stands: the report lists the skips in shard order, the
    manifest the rows, however many processes decode."""
    audio = open(bundled(1)[0][0], "rb").read()
    write_shard(tmp_path / "snap" / "read_aloud" / "train-00000-of-00001.parquet",
                [record("a", "   ", audio), record("b", "hej", audio), record("", "hej", audio),
                 record("c", "hej", False), record("d", "hej", audio)])
    prepare_coral(tmp_path / "snap", tmp_path / "out", splits=["train"], num_workers=workers)
    with open(tmp_path / "out" / "skipped_train.tsv", newline="", encoding="utf-8") as f:
        report = [(r["id"], r["row"], r["reason"]) for r in csv.DictReader(f, delimiter="\t")]
    assert report == [("a", "0", "empty transcript"), ("", "2", "empty id"),
                      ("c", "3", "audio bytes missing")]
    assert [r["ID"] for r in read_csv(tmp_path / "out" / "train.csv")] == ["b", "d"]

def test_duplicate_id_is_an_error_naming_both_rows(tmp_path):
    make_coral(tmp_path / "snapshot")
    p0 = bundled(1)[0][0]
    write_shard(tmp_path / "snapshot" / "read_aloud" / "train-00001-of-00002.parquet",
                [record("rec_0010", "hej", open(p0, "rb").read()),
                 record("rec_0001", "hej igen", open(p0, "rb").read())])
    with pytest.raises(ValueError, match=r"'rec_0001' .*appears twice: "
                       r"train-00000-of-00002\.parquet row 0 and "
                       r"train-00001-of-00002\.parquet row 1"):
        prepare_coral(tmp_path / "snapshot", tmp_path / "out", splits=["train"])


def test_errors_name_the_path_the_columns_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere not found\. Fix: .*huggingface-cli "
                       r"download alexandrainst/coral --repo-type dataset"):
        prepare_coral(tmp_path / "nowhere", tmp_path / "out")
    make_coral(tmp_path / "snapshot")
    with pytest.raises(FileNotFoundError, match=r"subset 'conversation', split 'train'.*"
                       r"read_aloud/train-00000-of-00002\.parquet.*huggingface-cli"):
        prepare_coral(tmp_path / "snapshot", tmp_path / "out", subset="conversation")
    with pytest.raises(ValueError, match="Unknown CoRal subset 'readaloud'"):
        prepare_coral(tmp_path / "snapshot", tmp_path / "out", subset="readaloud")
    no_text = pa.schema([f for f in SCHEMA if f.name != "text"])
    shard = tmp_path / "snapshot" / "read_aloud" / "val" / "0000.parquet"
    write_shard(shard, [{k: v for k, v in record("v", "x", b"").items() if k != "text"}],
                no_text)
    with pytest.raises(ValueError, match=r"0000\.parquet: no `text` column \(columns found: "
                       r"\['id_recording', .*'audio', 'asr_cer'\]\)\. Fix: data_folder must be "
                       r"a snapshot of alexandrainst/coral"):
        prepare_coral(tmp_path / "snapshot", tmp_path / "out", splits=["val"])
    write_shard(shard, [record("v1", "", open(bundled(1)[0][0], "rb").read())])
    with pytest.raises(ValueError, match=r"val: no usable rows in 1 shard\(s\).*1 skipped; "
                       r"reasons in .*skipped_val\.tsv"):
        prepare_coral(tmp_path / "snapshot", tmp_path / "out", splits=["val"])


def test_conversation_subset_ids_and_string_ages(tmp_path):
    (p, t, x), = bundled(1)
    schema = pa.schema([("id_conversation", pa.string()), ("id_speaker", pa.string()),
                        ("age", pa.string()), ("gender", pa.string()), ("dialect", pa.string()),
                        ("country_birth", pa.string()), ("overlap", pa.bool_()),
                        ("text", pa.string()), ("audio", SCHEMA.field("audio").type)])
    rows = [{"id_conversation": f"conv_07f9_{i:05d}", "id_speaker": "spe_7556", "age": "26",
             "gender": "female", "dialect": "nordsjællandsk", "country_birth": "DK",
             "overlap": False, "text": t, "audio": {"bytes": open(p, "rb").read(), "path": None}}
            for i in range(2)]
    write_shard(tmp_path / "snapshot" / "conversation" / "train" / "0000.parquet", rows, schema)
    out = prepare_coral(tmp_path / "snapshot", tmp_path / "out", subset="conversation",
                        splits=["train"])
    got = [(r["ID"], r["spk_id"], r["dialect"], r["age_group"]) for r in read_csv(out["train"])]
    assert got == [(f"conv_07f9_{i:05d}", "spe_7556", "Sjællandsk", "25-49") for i in range(2)]


def test_recipe_manifests_are_whole(tmp_path):
    """The recipe filters training durations itself, so every recipe and run can share one
    prepared folder: the recipe's manifests are the whole splits."""
    make_coral(tmp_path / "snapshot")
    whole = prepare_coral(tmp_path / "snapshot", tmp_path / "whole")
    hparams = {"data_folder": str(tmp_path / "snapshot"), "manifest_folder": str(tmp_path / "m"),
               "language": "da", "coral_subset": "read_aloud", "sample_rate": 16000,
               "min_duration": 0.0, "max_duration": 0.5, "prepare_workers": 2}
    manifests = prepare_coral_recipe_checked(hparams)
    for split, path in (("train", manifests.train), ("val", manifests.valid),
                        ("test", manifests.tests["test"])):
        # decoded in 2 processes: the same rows, in the same order, as in this one
        fields = ("ID", "duration", "wrd", "spk_id", "dialect", "gender", "age_group")
        assert [[r[k] for k in fields] for r in read_csv(path)] == \
            [[r[k] for k in fields] for r in read_csv(whole[split])]


def prepare_coral_recipe_checked(hparams):
    manifests = coral.prepare_coral_recipe(hparams)
    folder = hparams["manifest_folder"]
    assert isinstance(manifests, Manifests)
    assert (manifests.train, manifests.valid, manifests.tests) == (
        f"{folder}/train.csv", f"{folder}/val.csv", {"test": f"{folder}/test.csv"})
    return manifests


def test_the_data_folder_is_a_config_folder_only_for_its_own_subset(tmp_path):
    """data_folder=<snapshot>/read_aloud is the read_aloud config folder; asked for the
    conversation subset, it must not hand out the read-aloud shards."""
    make_coral(tmp_path / "snapshot")
    config = tmp_path / "snapshot" / "read_aloud"
    assert [p.name for p in coral.find_shards(config, "read_aloud", "val")] == ["0000.parquet"]
    with pytest.raises(FileNotFoundError, match=r"subset 'conversation', split 'val' under "
                       r".*read_aloud \(.*the 'read_aloud' subset's\)\. Fix: data_folder must be "
                       r"a snapshot of the dataset repo \(or its conversation/ folder\)"):
        prepare_coral(config, tmp_path / "out", subset="conversation", splits=["val"])


def test_a_moved_folder_prepares_again_reusing_its_audio(tmp_path, monkeypatch):
    """The CSV holds the FLACs' absolute paths: a moved prepared folder is prepared again,
    pointing into the new place, decoding only a FLAC that is cut short."""
    expected = make_coral(tmp_path / "snapshot")
    prepare_coral(tmp_path / "snapshot", tmp_path / "a", splits=["train"])
    (tmp_path / "a").rename(tmp_path / "b")
    cut = tmp_path / "b" / "audio" / "train" / "rec_0001.flac"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # header intact
    decoded = []
    real_decode = coral._decode
    monkeypatch.setattr(coral, "_decode", lambda a, r: decoded.append(1) or real_decode(a, r))
    csv_path = prepare_coral(tmp_path / "snapshot", tmp_path / "b", splits=["train"])["train"]
    rows = read_csv(csv_path)
    assert [r["wav"] for r in rows] == [str(tmp_path / "b" / "audio" / "train" / f"{i}.flac")
                                        for i in ("rec_0001", "rec_0002_x", "rec_0003",
                                                  "rec_0009", "rec_0010")]
    assert len(decoded) == 3  # the cut FLAC, and the two rows whose audio cannot be decoded
    audio, _ = sf.read(str(cut), dtype="float32")  # whole again
    np.testing.assert_allclose(audio, expected["rec_0001"], atol=TOL)


def test_changed_shards_are_decoded_again_not_matched_by_id(tmp_path):
    """A newer revision downloaded into the same folder keeps the IDs but not the audio: the
    split's FLACs are not reused when the shards (names and sizes) differ from the stamp's."""
    expected = make_coral(tmp_path / "snapshot")
    args = (tmp_path / "snapshot", tmp_path / "out")
    prepare_coral(*args, splits=["train"])
    shard = tmp_path / "snapshot" / "read_aloud" / "train-00000-of-00002.parquet"
    write_shard(shard, [record("rec_0001", "ny tekst", wav_bytes(expected["rec_0010"], 16000))])
    rows = {r["ID"]: r for r in read_csv(prepare_coral(*args, splits=["train"])["train"])}
    assert set(rows) == {"rec_0001", "rec_0009", "rec_0010"}
    audio, _ = sf.read(rows["rec_0001"]["wav"], dtype="float32")
    np.testing.assert_allclose(audio, expected["rec_0010"], atol=TOL)  # the new audio
    assert not (tmp_path / "out" / "audio" / "train" / "rec_0003.flac").exists()


def test_temporary_names_are_unique_per_process(tmp_path, monkeypatch):
    make_coral(tmp_path / "snapshot")
    stale = tmp_path / "out" / "audio" / "val" / "val_0.flac.tmp"  # a killed run's, no PID
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    written = []
    real_write = sf.write
    monkeypatch.setattr(sf, "write", lambda path, *a, **k: written.append(str(path))
                        or real_write(path, *a, **k))
    prepare_coral(tmp_path / "snapshot", tmp_path / "out", splits=["val"])
    assert len(written) == 2 and all(p.endswith(f".flac.{os.getpid()}.tmp") for p in written)
    assert not list(stale.parent.glob("*.tmp"))


def test_local_script_takes_the_recipes_flag_names(tmp_path, monkeypatch, capsys):
    make_coral(tmp_path / "snapshot")
    script = REPO / "local" / "prepare_coral.py"
    doc = script.read_text(encoding="utf-8")
    for said in ("--manifest_folder", "--min_duration/--max_duration", "torchrun", "2 h"):
        assert said in doc
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "snapshot"),
                                      str(tmp_path / "out"), "--splits", "val", "--sample_rate",
                                      "16000", "--min_duration", "0.5", "--max_duration", "30",
                                      "--coral_subset", "read_aloud"])
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out == f"val: {tmp_path / 'out' / 'val.csv'}\n"
