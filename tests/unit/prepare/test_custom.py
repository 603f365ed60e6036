"""speechtune.prepare.custom: a user's CSV/JSONL manifests -> contract manifests, clear errors."""

import csv
import json
import shutil
import unicodedata

import pytest
from fakes import SYNTHETIC

from speechtune import data
from speechtune.prepare.custom import (
    ManifestError,
    describe_missing_audio,
    prepare_custom,
    prepare_manifest,
    read_rows,
)

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
     r"id 'x' in row 1 \(line 2\) and row 2 \(line 3\).*make ids unique"),
    ("audio,text,duration\na.wav,hej,1.5s\n", "train.csv",
     r"row 1 \(line 2\): duration '1.5s' is not a positive number.*delete the `duration` "
     r"column"),
    ("audio,text\nnope.wav,hej\n", "train.csv",
     r"row 1 \(line 2\): audio file .*nope.wav does not exist.*check the path"),
    ("audio,text\nbroken.wav,hej\n", "train.csv",
     r"row 1 \(line 2\): cannot read audio .*re-encode"),
    ('{"audio": "a.wav", "text": "hej"}\n\n{oops\n', "train.jsonl",
     r"row 2 \(line 3\): not JSON"),  # a blank line: skipped, counted as a line
    ("audio,text,words\na.wav,hej,x\n", "train.csv", r"\['words'\] are reserved.*rename"),
    ("audio,text\na.wav,hej,extra\n", "train.csv",
     r"row 1 \(line 2\): more fields than the header"),
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
    with pytest.raises(ManifestError, match=r"train.csv: manifest does not exist.*audio column"):
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


def test_rows_and_lines_are_counted_apart_after_a_quoted_line_break(tmp_path):
    """A transcript with a line break in quotes is one row over two lines: messages name the
    row (as default ids count) and the file's own line (as an editor shows it)."""
    path = bad(tmp_path, 'id,audio,text,duration\n'
                         'a,a.wav,hej,1\n'
                         'b,b.wav,"to\nlinjer",1\n'  # row 2, lines 3-4
                         '\n'  # a blank line (line 5): no row
                         'c,c.wav,hej,1.5s\n')  # row 3, line 6
    with pytest.raises(ManifestError, match=r"train.csv, row 3 \(line 6\): duration '1.5s'"):
        prepare_manifest(path, tmp_path / "out" / "train.csv", tmp_path, "train")
    path.write_text('id,audio,text,duration\na,a.wav,hej,1\na,b.wav,"to\nlinjer",1\n',
                    encoding="utf-8")
    with pytest.raises(ManifestError, match=r"id 'a' in row 1 \(line 2\) and row 2 "
                                            r"\(lines 3-4\)"):
        prepare_manifest(path, tmp_path / "out" / "train.csv", tmp_path, "train")
    assert read_rows(path)[1] == ("row 2 (lines 3-4)",
                                  {"id": "a", "audio": "b.wav", "text": "to\nlinjer",
                                   "duration": "1"})


def test_jsonl_transcripts_keep_unicode_line_separators(tmp_path):
    """JSON writes U+2028 and NEL (U+0085) raw inside strings; splitting the file at them cut
    the row in two and stopped with 'not JSON'."""
    texts = ["en\u2028to", "tre\x85fire"]
    path = write_jsonl(tmp_path / "train.jsonl", [{"audio": "a.wav", "text": t} for t in texts])
    assert [(where, row["text"]) for where, row in read_rows(path)] == [
        ("row 1 (line 1)", texts[0]), ("row 2 (line 2)", texts[1])]


@pytest.mark.parametrize("make,phrase,fix", [
    (lambda p: p.mkdir(), "is a directory", "name an audio file inside it"),
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)", "re-export the audio"),
    (lambda p: p.symlink_to(p), "is a symlink loop", "repair the link"),
    (lambda p: p.symlink_to(p.parent / "gone.flac"),
     "is a symlink to a missing file {tmp}/gone.flac", "repair the link"),
    (lambda p: None, "does not exist", "check the path"),
])
def test_audio_that_cannot_be_read_says_why(tmp_path, make, phrase, fix):
    audio = tmp_path / "clip.flac"
    make(audio)
    phrase = phrase.format(tmp=tmp_path)
    assert describe_missing_audio(audio) == phrase
    path = bad(tmp_path, "audio,text\nclip.flac,hej\n")
    with pytest.raises(ManifestError) as err:
        prepare_manifest(path, tmp_path / "out" / "train.csv", tmp_path, "train")
    assert str(err.value).startswith(f"{path}, row 1 (line 2): audio file {audio} {phrase}. "
                                     f"Fix: {fix}")


def test_readable_audio_and_a_link_to_it_pass(tmp_path, corpus):
    clip = next((corpus / "clips").iterdir())
    (tmp_path / "link.flac").symlink_to(clip)
    assert describe_missing_audio(clip) is None
    assert describe_missing_audio(tmp_path / "link.flac") is None


def test_a_name_in_another_unicode_form_is_named_with_both_forms(corpus, tmp_path):
    """macOS writes file names in NFD ('a' + combining ring); a manifest typed elsewhere spells
    them NFC ('å'): on Linux these are different names, and the file was just 'not found'."""
    clip = next((corpus / "clips").iterdir())
    nfd = lambda name: unicodedata.normalize("NFD", name)  # noqa: E731
    folder = corpus / nfd("Århus")
    folder.mkdir()
    shutil.copy(clip, folder / nfd("blåbær.flac"))
    path = bad(corpus, "audio,text\nÅrhus/blåbær.flac,hej\n")
    with pytest.raises(ManifestError) as err:
        prepare_manifest(path, tmp_path / "out" / "train.csv", corpus, "train")
    message = str(err.value)
    assert f"audio file {corpus / 'Århus' / 'blåbær.flac'} is not there as spelled, but " \
           f"{folder / nfd('blåbær.flac')} is" in message
    assert r"'\xc5rhus' (NFC) here, 'A\u030arhus' (NFD) on disk" in message
    assert r"'bl\xe5b\xe6r.flac' (NFC) here, 'bla\u030ab\xe6r.flac' (NFD) on disk" in message
    assert "Fix: spell the name in the manifest as the file system does" in message
    path.write_text(nfd("audio,text\nÅrhus/blåbær.flac,hej\n"), encoding="utf-8")
    prepare_manifest(path, tmp_path / "out" / "train.csv", corpus, "train")  # as spelled: found
    assert data.read_manifest(tmp_path / "out" / "train.csv", "unused")["train_000001"][
        "wav"] == str(folder / nfd("blåbær.flac"))
