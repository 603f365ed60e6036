"""CommonVoice preparation on a fake release in the real layout, with real 48 kHz mp3 clips."""

import csv
import os
import runpy
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from fakes import CV_HEADER, REPO, SYNTHETIC

from speechtune.data import Manifests, load_audio, read_manifest
from speechtune.prepare import commonvoice
from speechtune.prepare.commonvoice import (
    COLUMNS,
    prepare_commonvoice,
    prepare_commonvoice_recipe,
    read_tsv,
)

HEADER = CV_HEADER  # a recent release's 13 columns


def tsv_line(client, n, sentence, age="", gender="", accents=""):
    """One TSV line of a recent release (13 columns; the sentence is written as is)."""
    return "\t".join([client, f"common_voice_da_{n}.mp3", f"s{n}", sentence, "", "2", "0", age,
                      gender, accents, "", "da", ""])


TRAIN = [
    tsv_line("c1", 1, "Børnene leger i sneen ved åen.", "twenties", "male_masculine"),
    tsv_line("c2", 2, 'Han sagde "hej" til mig.', "thirties", "female_feminine", "Sjællandsk"),
    tsv_line("c1", 3, "Først\tog så  bagefter"),  # a tab inside the sentence
    tsv_line("c3", 4, "   "),  # empty sentence
    tsv_line("c3", 5, "?! …"),  # nothing left after normalisation
    tsv_line("c2", 6, "Den her fil mangler."),  # no clip file
    tsv_line("c2", 14, 'Hun sagde "nej, og gik.'),  # an unclosed quote
    "c9\tcommon_voice_da_15.mp3\tfor få felter",  # fewer fields than the header
    tsv_line("c3", 16, "Æbler, ører og åer for $5."),  # "$5" is text, not a variable
    tsv_line("c3", 17, "Ødelagt lydfil."),  # an mp3 that is not audio
]
DEV = [tsv_line("c4", 7, "Mette maler en båd."), tsv_line("c5", 8, "Vi ses på fredag.")]
TEST = [tsv_line("c6", 9, "Min bedstemor bor i Århus."), tsv_line("c6", 10, "Hvor er toget?")]
EXTRA = [tsv_line("c7", 11, "Et helt nyt udsagn."),  # kept in validated mode
         tsv_line("c4", 12, "Endnu en sætning."),  # a dev speaker
         tsv_line("c8", 13, "min bedstemor bor i århus!")]  # a test sentence
AUDIO = [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 16]  # clips with real mp3 files
TRAIN_IDS = {f"common_voice_da_{n}" for n in (1, 2, 3, 14, 16)}


def write_tsv(path, lines, header=HEADER):
    path.write_text("\n".join(["\t".join(header), *lines]) + "\n", encoding="utf-8")


def rows_of(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def skipped_of(path):
    return dict(line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``<root>/cv-corpus-99.0/da``: the TSVs above, clips/*.mp3 at 48 kHz made from bundled
    English and Danish utterances; ``true`` holds each clip's duration, ``source`` its FLAC."""
    folder = tmp_path_factory.mktemp("cv") / "cv-corpus-99.0" / "da"
    (folder / "clips").mkdir(parents=True)
    sources = [SYNTHETIC / lang / "wav" / f"{lang}_train_{i:04d}.flac"
               for lang in ("da", "en") for i in range(7)]
    true, source = {}, {}
    for n, flac in zip(AUDIO, sources, strict=True):
        x, sr = sf.read(flac, dtype="float32")
        y = torchaudio.functional.resample(torch.from_numpy(x), sr, 48000).numpy()
        sf.write(folder / "clips" / f"common_voice_da_{n}.mp3", y, 48000, format="MP3")
        true[f"common_voice_da_{n}"], source[f"common_voice_da_{n}"] = len(x) / sr, flac
    (folder / "clips" / "common_voice_da_17.mp3").write_bytes(os.urandom(3000))
    write_tsv(folder / "train.tsv", TRAIN)
    write_tsv(folder / "dev.tsv", DEV)
    write_tsv(folder / "test.tsv", TEST)
    write_tsv(folder / "validated.tsv", TRAIN + DEV + TEST + EXTRA)
    return SimpleNamespace(folder=folder, true=true, source=source)


@pytest.fixture
def copy(release, tmp_path):
    """A copy of the release this test may change."""
    return shutil.copytree(release.folder, tmp_path / "cv" / "da")


def test_manifests_rows_text_groups_and_durations(release, tmp_path):
    out = prepare_commonvoice(release.folder, tmp_path / "csv", "da")
    assert set(out) == {"train", "dev", "test"}
    rows = {r["ID"]: r for r in rows_of(out["train"])}
    assert list(next(iter(rows.values()))) == COLUMNS
    assert set(rows) == TRAIN_IDS
    one = rows["common_voice_da_1"]
    assert one["wrd"] == "Børnene leger i sneen ved åen."  # as written, æøå kept
    assert one["wav"] == "$data_root/clips/common_voice_da_1.mp3"
    assert (one["spk_id"], one["age"], one["gender"], one["accents"]) == (
        "c1", "twenties", "male_masculine", "unknown")
    assert rows["common_voice_da_2"]["wrd"] == 'Han sagde "hej" til mig.'
    assert rows["common_voice_da_2"]["accents"] == "Sjællandsk"
    assert rows["common_voice_da_3"]["wrd"] == "Først og så bagefter"
    assert rows["common_voice_da_14"]["wrd"] == 'Hun sagde "nej, og gik.'
    assert rows["common_voice_da_16"]["wrd"] == "Æbler, ører og åer for $5."
    # the recipe's manifest reader expands $data_root in `wav` only
    read = read_manifest(out["train"], release.folder)
    assert read["common_voice_da_16"]["wrd"] == "Æbler, ører og åer for $5."
    assert read["common_voice_da_16"]["wav"] == f"{release.folder}/clips/common_voice_da_16.mp3"
    for utt_id, row in rows.items():
        assert float(row["duration"]) == pytest.approx(release.true[utt_id], abs=0.002)
    assert [r["ID"] for r in rows_of(out["dev"])] == ["common_voice_da_7", "common_voice_da_8"]
    assert [r["wrd"] for r in rows_of(out["test"])] == ["Min bedstemor bor i Århus.",
                                                       "Hvor er toget?"]


def test_skip_report_lists_every_dropped_clip(release, tmp_path, caplog):
    prepare_commonvoice(release.folder, tmp_path, "da", splits=["train"])
    skipped = skipped_of(tmp_path / "skipped_train.tsv")
    assert set(skipped) == {f"common_voice_da_{n}.mp3" for n in (4, 5, 6, 15, 17)}
    assert skipped["common_voice_da_4.mp3"] == "empty sentence"
    assert "empty after text normalisation" in skipped["common_voice_da_5.mp3"]
    assert "not found" in skipped["common_voice_da_6.mp3"]
    assert "3 fields, the header has 13" in skipped["common_voice_da_15.mp3"]
    assert "unreadable audio" in skipped["common_voice_da_17.mp3"]
    assert "5 clip(s) skipped" in caplog.text and "skipped_train.tsv" in caplog.text


def test_read_tsv_finds_columns_by_name_in_an_older_release(tmp_path):
    header = ["path", "sentence", "client_id", "up_votes", "down_votes", "age", "gender",
              "accent"]
    (tmp_path / "train.tsv").write_text(
        "\t".join(header) + "\na.mp3\tEn\tto\ttre\tc1\t1\t0\tteens\tmale\tjysk\n"
        'b.mp3\t"Citat\tc2\t1\t0\t\t\t\n', encoding="utf-8")
    rows, skipped = read_tsv(tmp_path / "train.tsv")
    assert skipped == []
    assert [(r["path"], r["sentence"], r["client_id"], r["accent"]) for r in rows] == [
        ("a.mp3", "En to tre", "c1", "jysk"), ("b.mp3", '"Citat', "c2", "")]


def test_on_the_fly_audio_loads_at_16k(release, tmp_path):
    out = prepare_commonvoice(release.folder, tmp_path, "da", splits=["dev"])
    for row in rows_of(out["dev"]):
        sig = load_audio(row["wav"].replace("$data_root", str(release.folder)), 16000).numpy()
        original, sr = sf.read(release.source[row["ID"]], dtype="float32")
        assert sr == 16000 and len(sig) == len(original)
        assert np.corrcoef(sig, original)[0, 1] > 0.99  # mp3-coded, but the same signal


def test_once_writes_16k_flac_close_to_the_on_the_fly_decode(release, tmp_path):
    out = prepare_commonvoice(release.folder, tmp_path, "da", splits=["train", "test"],
                              resample="once", num_workers=2)
    rows = rows_of(out["train"])
    assert {r["ID"] for r in rows} == TRAIN_IDS
    for row in rows + rows_of(out["test"]):
        assert row["wav"] == str((tmp_path / "clips_16000" / f"{row['ID']}.flac").resolve())
        info = sf.info(row["wav"])
        assert (info.samplerate, info.format, info.subtype) == (16000, "FLAC", "PCM_16")
        assert float(row["duration"]) == pytest.approx(release.true[row["ID"]], abs=0.001)
        flac, _ = sf.read(row["wav"], dtype="float32")
        mp3 = release.folder / "clips" / f"{row['ID']}.mp3"
        fly = load_audio(str(mp3), 16000).numpy()
        assert len(flac) == len(fly) and np.abs(flac - fly).max() < 1e-3
    assert "unreadable audio" in skipped_of(tmp_path / "skipped_train.tsv")[
        "common_voice_da_17.mp3"]
    assert not list((tmp_path / "clips_16000").glob("*.tmp"))


def test_rerun_keeps_existing_outputs(release, tmp_path):
    args = (release.folder, tmp_path, "da")
    out = prepare_commonvoice(*args, splits=["dev"], resample="once")
    old = 1_000_000_000
    flacs = sorted((tmp_path / "clips_16000").glob("*.flac"))
    for path in [*flacs, out["dev"]]:
        os.utime(path, (old, old))
    prepare_commonvoice(*args, splits=["dev"], resample="once")
    assert os.stat(out["dev"]).st_mtime == old  # the manifest is kept
    flacs[0].unlink()
    prepare_commonvoice(*args, splits=["dev"], resample="once", skip_existing=False)
    assert os.stat(out["dev"]).st_mtime != old  # rewritten ...
    assert flacs[0].is_file() and os.stat(flacs[1]).st_mtime == old  # ... converting only one
    os.utime(out["dev"], (old, old))
    prepare_commonvoice(*args, splits=["dev"], resample="once", max_duration=60.0)
    assert os.stat(out["dev"]).st_mtime != old  # other settings: prepared again


def test_a_killed_conversion_leaves_no_flac_that_looks_done(release, tmp_path, monkeypatch):
    write = sf.write

    def killed_midway(path, data, *args, **kwargs):
        write(path, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(sf, "write", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_commonvoice(release.folder, tmp_path, "da", splits=["dev"], resample="once")
    assert not list((tmp_path / "clips_16000").glob("*.flac"))
    monkeypatch.setattr(sf, "write", write)
    out = prepare_commonvoice(release.folder, tmp_path, "da", splits=["dev"], resample="once")
    assert not list((tmp_path / "clips_16000").glob("*.tmp"))
    for row in rows_of(out["dev"]):
        assert sf.info(row["wav"]).duration == pytest.approx(release.true[row["ID"]], abs=0.001)


def test_validated_excludes_dev_test_speakers_and_sentences(release, tmp_path, caplog):
    caplog.set_level("INFO")
    out = prepare_commonvoice(release.folder, tmp_path, "da", splits=["train"],
                              train_tsv="validated")
    assert {r["ID"] for r in rows_of(out["train"])} == TRAIN_IDS | {"common_voice_da_11"}
    skipped = skipped_of(tmp_path / "skipped_train.tsv")
    for n in (7, 8, 9, 10, 12):
        assert skipped[f"common_voice_da_{n}.mp3"] == "speaker in dev.tsv or test.tsv"
    assert skipped["common_voice_da_13.mp3"] == "sentence in dev.tsv or test.tsv"
    assert "6 validated clip(s) excluded" in caplog.text


def test_clip_durations_used_when_present(copy):
    lines = [f"{clip.name}\t1234" for clip in sorted((copy / "clips").glob("*.mp3"))]
    (copy / "clip_durations.tsv").write_text("clip\tduration[ms]\n" + "\n".join(lines) + "\n")
    out = prepare_commonvoice(copy, copy.parent / "csv", "da", splits=["train"])
    durations = {r["ID"]: r["duration"] for r in rows_of(out["train"])}
    # the durations are the file's, and the broken mp3 is only found when it is decoded:
    assert durations == {i: "1.234" for i in TRAIN_IDS | {"common_voice_da_17"}}
    out = prepare_commonvoice(copy, copy.parent / "once", "da", splits=["train"],
                              resample="once")
    assert {r["ID"] for r in rows_of(out["train"])} == TRAIN_IDS
    report = skipped_of(copy.parent / "once" / "skipped_train.tsv")
    assert "cannot decode audio" in report["common_voice_da_17.mp3"]


def test_errors_name_the_path_and_the_fix(copy, tmp_path):
    locale = r"cv/train.tsv not found: data_folder must be the locale folder .*/cv-corpus-17.0/da"
    with pytest.raises(FileNotFoundError, match=locale):
        prepare_commonvoice(copy.parent, tmp_path, "da")  # the release, not its locale
    with pytest.raises(ValueError, match="resample='twice'"):
        prepare_commonvoice(copy, tmp_path, "da", resample="twice")
    with pytest.raises(ValueError, match="train_tsv='other'"):
        prepare_commonvoice(copy, tmp_path, "da", train_tsv="other")
    with pytest.raises(ValueError, match="No text normaliser for language 'xx'"):
        prepare_commonvoice(copy, tmp_path, "xx")
    write_tsv(copy / "test.tsv", [tsv_line("c6", 9, "")])
    with pytest.raises(ValueError, match="test: no usable clip in .*test.tsv.*skipped_test.tsv"):
        prepare_commonvoice(copy, tmp_path, "da", splits=["test"])
    write_tsv(copy / "dev.tsv", ["c4\tcommon_voice_da_7.mp3"], header=["client_id", "path"])
    with pytest.raises(ValueError, match=r"dev.tsv: missing column\(s\) \['sentence'\]"):
        prepare_commonvoice(copy, tmp_path, "da", splits=["dev"])



def test_another_locales_folder_stops_naming_the_locale_and_the_fix(release, tmp_path):
    """The TSVs' locale column must be the run's language (its region part aside): a German
    run pointed at the Danish folder would train and score on Danish text quietly."""
    with pytest.raises(ValueError, match=r"train.tsv holds clips of locale 'da' but the run "
                                         r"expects language 'de'.*--language=da"):
        prepare_commonvoice(release.folder, tmp_path, "de", splits=["train"])
    with pytest.raises(ValueError, match="expects locale 'da-DK'.*--locale=da"):
        prepare_commonvoice(release.folder, tmp_path, "da", splits=["train"], locale="da-DK")
    # a locale whose code names another language: accepted when named
    out = prepare_commonvoice(release.folder, tmp_path, "nb", splits=["dev"], locale="da")
    assert rows_of(out["dev"])
    with pytest.raises(ValueError, match="looks like a CommonVoice locale: pass its language "
                                         "code, --language=sv"):
        prepare_commonvoice(release.folder, tmp_path, "sv-SE")

def test_recipe_function_prepares_whole_splits(release, tmp_path):
    """The recipe filters training durations itself, so one prepared folder serves every
    recipe and run of a language: the recipe function's manifests are the whole splits."""
    hparams = {"data_folder": str(release.folder), "manifest_folder": str(tmp_path),
               "language": "da", "train_tsv": "train", "resample": "on_the_fly",
               "sample_rate": 16000, "prepare_workers": 1, "min_duration": 1.3,
               "max_duration": 2.3}
    manifests = prepare_commonvoice_recipe(hparams)
    assert manifests == Manifests(train=str(tmp_path / "train.csv"),
                                  valid=str(tmp_path / "dev.csv"),
                                  tests={"test": str(tmp_path / "test.csv")})
    assert {r["ID"] for r in rows_of(manifests.train)} == TRAIN_IDS
    assert len(rows_of(manifests.valid)) == 2 and len(rows_of(manifests.tests["test"])) == 2


def test_read_tsv_rejoins_a_sentence_only_when_the_columns_after_it_fit(tmp_path):
    """A tab inside the sentence is joined back; a stray tab elsewhere (trailing, in another
    column) would glue the next column onto the sentence: such a line is skipped instead."""
    lines = [tsv_line("c1", 1, "Hej med dig"),
             tsv_line("c1", 2, "Hej\tmed dig"),  # a tab in the sentence: joined back
             tsv_line("c1", 3, "Hej med dig") + "\t",  # a trailing tab
             tsv_line("c1", 4, "Hej med dig", age="twen\tties"),  # a tab in another column
             tsv_line("c1", 5, "Hej med dig").replace("\tda\t", "\tda\tx\t")]  # in variant
    lines[0] = lines[0].replace("\t\t2\t", "\tgeneral\t2\t")  # a sentence_domain to glue on
    lines[2] = lines[2].replace("\t\t2\t", "\tgeneral\t2\t")
    write_tsv(tmp_path / "train.tsv", lines)
    rows, skipped = read_tsv(tmp_path / "train.tsv")
    assert [(r["path"], r["sentence"], r["sentence_domain"], r["up_votes"], r["locale"])
            for r in rows] == [("common_voice_da_1.mp3", "Hej med dig", "general", "2", "da"),
                               ("common_voice_da_2.mp3", "Hej med dig", "", "2", "da")]
    assert [clip for clip, _ in skipped] == [f"common_voice_da_{n}.mp3" for n in (3, 4, 5)]
    for (_, reason), number in zip(skipped, (4, 5, 6), strict=True):
        assert reason == (f"train.tsv line {number}: 14 fields for 13 columns, cannot tell "
                          "which hold the sentence")
    # nothing after the sentence to check: cannot tell either
    (tmp_path / "old.tsv").write_text("client_id\tpath\tsentence\nc1\ta.mp3\tEn\tto\n")
    rows, skipped = read_tsv(tmp_path / "old.tsv")
    assert rows == [] and "3 columns, cannot tell which hold the sentence" in skipped[0][1]


def test_a_moved_folder_prepares_again_reusing_its_flacs(release, tmp_path, monkeypatch):
    """The CSV holds the FLACs' absolute paths: after the prepared folder moves, the stale CSV
    is rewritten (pointing into the new place) without converting anything again."""
    prepare_commonvoice(release.folder, tmp_path / "a", "da", splits=["dev"], resample="once")
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.setattr(commonvoice, "load_audio", lambda *a: pytest.fail("converted again"))
    out = prepare_commonvoice(release.folder, tmp_path / "b", "da", splits=["dev"],
                              resample="once")
    wavs = [r["wav"] for r in rows_of(out["dev"])]
    assert wavs == [str((tmp_path / "b" / "clips_16000" / f"common_voice_da_{n}.flac").resolve())
                    for n in (7, 8)]
    assert all(os.path.isfile(w) for w in wavs)


def test_an_unreadable_stamp_means_prepare_again(release, tmp_path):
    out = prepare_commonvoice(release.folder, tmp_path, "da", splits=["dev"], resample="once")
    stamp = tmp_path / "dev.csv.source.json"
    stamp.write_text('{"data_folder": "/da', encoding="utf-8")  # cut short by a crash
    old = 1_000_000_000
    os.utime(out["dev"], (old, old))
    prepare_commonvoice(release.folder, tmp_path, "da", splits=["dev"], resample="once")
    assert os.stat(out["dev"]).st_mtime != old  # prepared again
    assert commonvoice.read_stamp(stamp)["save_folder"] == str(tmp_path.resolve())
    assert not list(tmp_path.glob("*.tmp"))  # the stamp goes through a temporary file


def test_a_broken_or_cut_flac_is_converted_again(release, tmp_path):
    """A FLAC cut short keeps a header counting every sample; one that is garbage has none:
    both are converted again, not reused or reported as skipped."""
    args = (release.folder, tmp_path, "da")
    out = prepare_commonvoice(*args, splits=["dev"], resample="once")
    cut, garbage = (tmp_path / "clips_16000" / f"common_voice_da_{n}.flac" for n in (7, 8))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert sf.info(str(cut)).frames > 0  # still looks whole from its header
    garbage.write_bytes(b"not a flac")
    prepare_commonvoice(*args, splits=["dev"], resample="once", skip_existing=False)
    assert [r["ID"] for r in rows_of(out["dev"])] == ["common_voice_da_7", "common_voice_da_8"]
    assert skipped_of(tmp_path / "skipped_dev.tsv") == {}
    for flac in (cut, garbage):
        audio, _ = sf.read(str(flac), dtype="float32")  # whole again
        assert len(audio) / 16000 == pytest.approx(release.true[flac.stem], abs=0.001)


def test_only_dead_processes_temp_files_are_removed(release, tmp_path):
    """Another live process's in-flight ``<ID>.flac.<pid>.tmp`` is left alone (its rename would
    fail); those of dead processes, of this one, or without a PID are removed."""
    clips = tmp_path / "clips_16000"
    clips.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {pid: clips / f"common_voice_da_1.flac.{pid}.tmp"
                 for pid in (live.pid, dead.pid, os.getpid(), "x")}
        for path in names.values():
            path.write_bytes(b"partial")
        prepare_commonvoice(release.folder, tmp_path, "da", splits=["dev"], resample="once")
        assert sorted(clips.glob("*.tmp")) == [names[live.pid]]
    finally:
        live.kill()
        live.wait()


def test_local_script_takes_the_recipes_flag_names(release, tmp_path, monkeypatch, capsys):
    script = REPO / "local" / "prepare_commonvoice.py"
    doc = script.read_text(encoding="utf-8")
    for said in ("--manifest_folder", "--min_duration/--max_duration", "torchrun", "2 h"):
        assert said in doc
    monkeypatch.setattr(sys, "argv", [str(script), str(release.folder), str(tmp_path), "da",
                                      "--splits", "dev", "--train_tsv", "train", "--resample",
                                      "once", "--sample_rate", "16000", "--min_duration", "0.5",
                                      "--max_duration", "30", "--prepare_workers", "1"])
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out == f"dev: {tmp_path / 'dev.csv'}\n"
