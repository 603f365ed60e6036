"""speechtune.prepare.custom: a user's CSV/JSONL manifests -> contract manifests, clear errors."""

import csv
import json
import shutil

import pytest
from fakes import SYNTHETIC

from speechtune import data
from speechtune.prepare.custom import ManifestError, prepare_custom, prepare_manifest

DA = SYNTHETIC / "da"


def bundled_rows(split, n):
    with open(DA / f"{split}.csv", newline="", encoding="utf-8") as f:
        return [r for _, r in zip(range(n), csv.DictReader(f), strict=False)]


@pytest.fixture
def corpus(tmp_path):
    """A user corpus: audio in ``clips/``, manifests beside it naming ``clips/<file>``."""
    (tmp_path / "clips").mkdir()
    for split in ("train", "valid", "test"):
        for r in bundled_rows(split, 3):
            shutil.copy(r["wav"].replace("$data_root", str(SYNTHETIC)), tmp_path / "clips")
    return tmp_path


def user_rows(split, n=3):
    """Rows in user spelling: audio/text/speaker, a group column, no id, no duration."""
    return [{"audio": f"clips/{r['ID']}.flac", "text": r["wrd"].upper() + ".",
             "speaker": r["spk_id"], "dialect": r["voice"]} for r in bundled_rows(split, n)]


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def hparams_for(folder, ext, out, test=True):
    return {"train_manifest": str(folder / f"train.{ext}"),
            "valid_manifest": str(folder / f"valid.{ext}"),
            "test_manifest": str(folder / f"test.{ext}") if test else None,
            "data_folder": str(folder), "manifest_folder": str(out)}


@pytest.mark.parametrize("ext,writer", [("csv", write_csv), ("jsonl", write_jsonl)])
def test_relative_paths_group_columns_and_durations_from_audio(corpus, tmp_path, ext, writer):
    for split in ("train", "valid", "test"):
        writer(corpus / f"{split}.{ext}", user_rows(split))
    manifests = prepare_custom(hparams_for(corpus, ext, tmp_path / "out"))
    assert set(manifests.tests) == {"test"}
    with open(manifests.train, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["ID", "duration", "wav", "spk_id", "wrd", "dialect"]
    expected = bundled_rows("train", 3)
    assert [r["ID"] for r in rows] == ["train_000001", "train_000002", "train_000003"]
    for row, bundled in zip(rows, expected, strict=True):
        assert row["wav"] == str(corpus / "clips" / f"{bundled['ID']}.flac")  # absolute
        assert float(row["duration"]) == pytest.approx(float(bundled["duration"]), abs=0.002)
        assert row["wrd"] == bundled["wrd"].upper() + "."  # as given: the recipe normalises
        assert row["spk_id"] == bundled["spk_id"] and row["dialect"] == bundled["voice"]
    # the recipe reads it like any other manifest
    assert len(data.read_manifest(manifests.tests["test"], "unused")) == 3


def test_bundled_contract_manifests_work_as_input_with_data_root(tmp_path):
    hparams = hparams_for(DA, "csv", tmp_path / "out")
    hparams["data_folder"] = str(SYNTHETIC)  # the bundled manifests' $data_root
    manifests = prepare_custom(hparams)
    rows = data.read_manifest(manifests.valid, "unused")
    bundled = bundled_rows("valid", 100)
    assert list(rows) == [r["ID"] for r in bundled]  # ids and order kept
    first = rows[bundled[0]["ID"]]
    assert first["wav"] == bundled[0]["wav"].replace("$data_root", str(SYNTHETIC))
    assert first["voice"] == bundled[0]["voice"] and first["gender"] == bundled[0]["gender"]


def test_written_once_and_rewritten_when_the_input_changes(corpus, tmp_path):
    for split in ("train", "valid"):
        write_csv(corpus / f"{split}.csv", user_rows(split))
    hparams = hparams_for(corpus, "csv", tmp_path / "out", test=False)
    manifests = prepare_custom(hparams)
    assert manifests.tests == {}
    out = tmp_path / "out" / "train.csv"
    mtime = out.stat().st_mtime_ns
    prepare_custom(hparams)  # the second call (every DDP process) only finds the files
    assert out.stat().st_mtime_ns == mtime
    write_csv(corpus / "train.csv", user_rows("train", 2))
    prepare_custom(hparams)
    assert len(data.read_manifest(out, "unused")) == 2


def bad(tmp_path, content, name="train.csv"):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("content,name,message", [
    ("audio,text\n", "train.csv", r"has no rows.*add one row per utterance"),
    ("", "train.jsonl", r"has no rows"),
    ("path,sentence\na.wav,hej\n", "train.csv", r"no `audio` or `wav` and no `text` or `wrd`"),
    ("audio,wav,text\na.wav,a.wav,hej\n", "train.csv", r"\['audio', 'wav'\] both mean `wav`"),
    ("id,audio,text,duration\nx,a.wav,hej,1\nx,b.wav,hej,1\n", "train.csv",
     r"id 'x' on line 2 and line 3.*make ids unique"),
    ("audio,text,duration\na.wav,hej,1.5s\n", "train.csv",
     r"line 2: duration '1.5s' is not a positive number.*delete the `duration` column"),
    ("audio,text\nnope.wav,hej\n", "train.csv", r"line 2: audio file .*nope.wav not found"),
    ("audio,text\nbroken.wav,hej\n", "train.csv", r"line 2: cannot read audio .*re-encode"),
    ('{"audio": "a.wav", "text": "hej"}\n{oops\n', "train.jsonl", r"line 2: not JSON"),
    ("audio,text,words\na.wav,hej,x\n", "train.csv", r"\['words'\] are reserved.*rename"),
    ("audio,text\na.wav,hej,extra\n", "train.csv", r"line 2: more fields than the header"),
    ("audio\ttext\n", "train.tsv", r"unknown manifest type '.tsv'"),
])
def test_bad_input_names_the_file_the_row_and_the_fix(tmp_path, content, name, message):
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav file")
    path = bad(tmp_path, content, name)
    with pytest.raises(ManifestError, match=message) as err:
        prepare_manifest(path, tmp_path / "out" / "train.csv", tmp_path, "train")
    assert str(path) in str(err.value)
    assert not (tmp_path / "out" / "train.csv").exists()


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"train.csv: manifest not found.*audio column"):
        prepare_custom(hparams_for(tmp_path, "csv", tmp_path / "out"))


@pytest.mark.parametrize("ext,writer", [("csv", write_csv), ("jsonl", write_jsonl)])
def test_a_byte_order_mark_keeps_the_first_column(corpus, tmp_path, ext, writer):
    """Excel's 'CSV UTF-8' and Notepad start the file with a UTF-8 byte-order mark; read as
    text it became part of the first column's name and the `id` column was lost."""
    for split in ("train", "valid", "test"):
        rows = [{"id": f"{split}-utt{i}", **r} for i, r in enumerate(user_rows(split))]
        path = writer(corpus / f"{split}.{ext}", rows)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    manifests = prepare_custom(hparams_for(corpus, ext, tmp_path / "out"))
    rows = data.read_manifest(manifests.train, "unused")
    assert list(rows) == ["train-utt0", "train-utt1", "train-utt2"]
    assert "dialect" in rows["train-utt0"] and not any("\ufeff" in k for k in rows["train-utt0"])


@pytest.mark.parametrize("name", ["train.csv", "train.jsonl"])
def test_another_encoding_names_the_line_the_byte_and_the_fix(tmp_path, name):
    path = tmp_path / name
    lines = ["audio,text", "a.wav,hej", "b.wav,café"] if name.endswith(".csv") else [
        '{"audio": "a.wav", "text": "hej"}', '{"audio": "b.wav", "text": "café"}']
    path.write_bytes("\n".join(lines).encode("cp1252"))
    with pytest.raises(ManifestError, match=r"line \d: byte 0xe9 at column \d+ is not UTF-8.*"
                                            r"re-save it as UTF-8") as err:
        prepare_manifest(path, tmp_path / "out" / "train.csv", tmp_path, "train")
    assert f"line {len(lines)}:" in str(err.value) and str(path) in str(err.value)


def test_a_contract_manifest_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("\ufeffID,duration,wav,spk_id,wrd\nu1,1.0,a.wav,s,hej\n", encoding="utf-8")
    assert list(data.read_manifest(path, "unused")) == ["u1"]
    path.write_bytes("ID,duration,wav,spk_id,wrd\nu1,1.0,a.wav,s,blåbær\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"line 2: byte 0xe5 .*not UTF-8"):
        data.read_manifest(path, "unused")
