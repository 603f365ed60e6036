"""The bundled Synthetic corpus honours its contract, and its generator is deterministic."""

import csv
import shutil
import subprocess
import sys

import pytest
import soundfile as sf
from fakes import REPO, SYNTHETIC

from speechtune.data import REQUIRED_COLUMNS, read_manifest

BUNDLED = {"en": ("train", "valid", "test"), "da": ("train", "valid", "test")}
HELDOUT = "en_heldout"
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="needs Debian's espeak-ng and sox (apt-get install -y espeak-ng sox)")


def manifest(lang, split):
    with open(SYNTHETIC / lang / f"{split}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("lang,minimum", [("en", 600), ("da", 300)])
def test_sizes_columns_and_sentence_disjoint_splits(lang, minimum):
    splits = {s: manifest(lang, s) for s in ("train", "valid", "test")}
    assert sum(len(r) for r in splits.values()) >= minimum
    for rows in splits.values():
        assert set(REQUIRED_COLUMNS) | {"voice", "gender"} <= set(rows[0])
        assert {r["gender"] for r in rows} == {"female", "male"}
    sentences = {s: {r["wrd"] for r in rows} for s, rows in splits.items()}
    assert not sentences["train"] & sentences["valid"]
    assert not sentences["train"] & sentences["test"]
    assert not sentences["valid"] & sentences["test"]
    voices = {r["voice"] for rows in splits.values() for r in rows}
    assert len(voices) >= 6


def test_danish_has_ae_oe_aa():
    text = " ".join(r["wrd"] for s in ("train", "valid", "test") for r in manifest("da", s))
    for letter in "æøå":
        assert text.count(letter) >= 20, letter


def test_audio_is_16k_mono_flac_matching_the_manifest_and_small():
    total = 0
    for lang in ("en", "da"):
        for split in ("train", "valid", "test"):
            for row in manifest(lang, split):
                path = row["wav"].replace("$data_root", str(SYNTHETIC))
                info = sf.info(path)
                assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
                assert abs(info.frames / 16000 - float(row["duration"])) < 0.002
    for path in SYNTHETIC.rglob("*.flac"):  # en, da, en_heldout and en_noisy: in the repository
        total += path.stat().st_size
    assert total <= 13e6


def test_heldout_voices_and_sentences_are_disjoint_from_the_bundled_corpus():
    rows = manifest(HELDOUT, "test")
    assert len(rows) >= 50
    assert set(REQUIRED_COLUMNS) | {"voice", "gender"} <= set(rows[0])
    assert {r["gender"] for r in rows} == {"female", "male"}
    voices = {r["voice"] for r in rows}
    assert len(voices) >= 6
    for split in BUNDLED["en"]:
        assert not voices & {r["voice"] for r in manifest("en", split)}, split
    sentences = [r["wrd"] for r in rows]
    assert len(set(sentences)) == len(sentences)
    bundled = {r["wrd"] for lang, splits in BUNDLED.items() for s in splits
               for r in manifest(lang, s)}
    assert not set(sentences) & bundled
    assert all(r["ID"].startswith(f"{HELDOUT}_") and
               r["wav"] == f"$data_root/{HELDOUT}/wav/{r['ID']}.flac" for r in rows)


def test_heldout_audio_exists_matches_the_manifest_and_fits_the_encoder_window():
    for row in manifest(HELDOUT, "test"):
        path = row["wav"].replace("$data_root", str(SYNTHETIC))
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
        assert abs(info.frames / 16000 - float(row["duration"])) < 0.05, row["ID"]
        assert float(row["duration"]) <= 7.5, row["ID"]


@needs_espeak
def test_generator_reproduces_the_committed_audio(tmp_path):
    """Re-running the generator (first 5 sentences per split) rewrites identical files."""
    subprocess.run([sys.executable, str(REPO / "local" / "make_synthetic_corpus.py"),
                    "--out", str(tmp_path), "--languages", "da", "--limit", "5"], check=True)
    rows = manifest("da", "train")
    new = list(csv.DictReader(open(tmp_path / "da" / "train.csv", encoding="utf-8")))
    assert len(new) >= 5
    for old_row, new_row in zip(rows, new, strict=False):
        assert old_row == new_row
        name = new_row["wav"].split("/")[-1]
        assert (tmp_path / "da" / "wav" / name).read_bytes() == (
            SYNTHETIC / "da" / "wav" / name).read_bytes()


@needs_espeak
def test_generator_reproduces_the_committed_heldout_set(tmp_path):
    """Re-running the generator for the held-out set (first 5 sentences) rewrites identical
    files, and it refuses a held-out sentence or voice that the bundled corpus holds."""
    script = str(REPO / "local" / "make_synthetic_corpus.py")
    subprocess.run([sys.executable, script, "--out", str(tmp_path), "--languages", HELDOUT,
                    "--limit", "5"], check=True)
    new = list(csv.DictReader(open(tmp_path / HELDOUT / "test.csv", encoding="utf-8")))
    assert len(new) == 5
    for old_row, new_row in zip(manifest(HELDOUT, "test"), new, strict=False):
        assert old_row == new_row
        name = new_row["wav"].split("/")[-1]
        assert (tmp_path / HELDOUT / "wav" / name).read_bytes() == (
            SYNTHETIC / HELDOUT / "wav" / name).read_bytes()
    sys.path.insert(0, str(REPO / "local"))
    try:
        import make_synthetic_corpus as gen
    finally:
        sys.path.remove(str(REPO / "local"))
    gen.check_heldout(1234, SYNTHETIC)
    bundled = manifest("en", "test")[0]
    with pytest.raises(ValueError, match="sentence.*also in the bundled corpus"):
        gen.check_heldout(1234, tmp_path, sentences=[bundled["wrd"]], voices=["en-us-nyc+m5"])
    with pytest.raises(ValueError, match="voice.*also in the bundled corpus"):
        gen.check_heldout(1234, tmp_path, sentences=["a new line"], voices=[bundled["voice"]])


def test_manifest_reader_expands_data_root_in_wav_only(tmp_path):
    """`$data_root` is the audio path's placeholder; a transcript may hold "$5" (SpeechBrain's
    CSV reader expanded `$name` in every field and stopped on it)."""
    path = tmp_path / "m.csv"
    path.write_text("ID,duration,wav,spk_id,wrd,dialect\n"
                    "a,1.5,$data_root/a.flac,s1,det koster $5,fynsk\n", encoding="utf-8")
    rows = read_manifest(path, "/corpus")
    assert rows == {"a": {"ID": "a", "duration": 1.5, "wav": "/corpus/a.flac", "spk_id": "s1",
                          "wrd": "det koster $5", "dialect": "fynsk"}}
    path.write_text("ID,duration,wav,spk_id,wrd\na,1.5,x.flac,s,t\na,2,y.flac,s,u\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\): duplicate ID 'a'"):
        read_manifest(path, "/corpus")
    path.write_text('ID,duration,wav,spk_id,wrd\na,1.5,x.flac,s,"two\nlines"\n'
                    'a,2,y.flac,s,"three\nmore\nlines"\n')  # quoted line breaks
    with pytest.raises(ValueError, match=r"row 2 \(lines 4-6\): duplicate ID 'a'"):
        read_manifest(path, "/corpus")
    path.write_text("ID,duration,wav,spk_id\na,1.5,x.flac,s\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['wrd'\]; a manifest needs"):
        read_manifest(path, "/corpus")
    path.write_text("ID,duration,wav,spk_id,wrd\na,1.5s,x.flac,s,t\n")
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): duration '1.5s' of 'a' is not a "
                                         r"number"):
        read_manifest(path, "/corpus")
