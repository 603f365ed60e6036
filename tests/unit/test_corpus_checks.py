"""Leakage between splits, degenerate training audio, event tags and durations outside the
limits, checked through the recipe's own pre-flight on a subset of the bundled corpus."""

import csv
import logging

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from fakes import SYNTHETIC, experiment

from speechtune import corpus_checks
from speechtune.corpus_checks import DegenerateLimits, audio_stats, collect_stats, degenerate
from speechtune.preflight import PreflightError
from speechtune.text import EventTags, get_normalizer

NORM = get_normalizer("en")


def read(path, delimiter=","):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def edit(data, split, change):
    """Apply ``change(rows)`` to the subset's ``split`` manifest."""
    path = data / "en" / f"{split}.csv"
    rows = read(path)
    change(rows)
    write(path, rows)
    return rows


def speech():
    samples, rate = sf.read(SYNTHETIC / "en" / "wav" / "en_train_0000.flac", dtype="float32")
    return samples, rate


def degenerate_files(tmp_path):
    """Digital silence, a full-scale 440 Hz tone, a constant DC signal, speech amplified 10x
    and clipped, and a half-scale tone, each as long as a bundled utterance."""
    samples, rate = speech()
    t = np.arange(len(samples)) / rate
    signals = {"silence": np.zeros_like(samples), "tone": np.sin(2 * np.pi * 440 * t),
               "dc": np.full_like(samples, 0.5), "clipped": np.clip(samples * 10, -1, 1),
               "half_tone": 0.5 * np.sin(2 * np.pi * 440 * t)}
    paths = {}
    for name, signal in signals.items():
        paths[name] = tmp_path / f"{name}.wav"
        sf.write(paths[name], signal.astype("float32"), rate, subtype="PCM_16")
    return paths, len(samples) / rate


# ------------------------------------------------------------------ degenerate audio
def test_the_bundled_speech_is_not_degenerate(tmp_path):
    limits = DegenerateLimits()
    files = sorted((SYNTHETIC / "en" / "wav").glob("*.flac"))[:40]
    for path in files:
        stats = audio_stats(path)
        assert degenerate(stats, limits) is None, (path, stats)
        assert -30 < stats.level_dbfs < -15 and stats.clipped == 0 and stats.flatness_db > -30
    # CommonVoice-like: upsampled to a 48 kHz mp3, empty above 8 kHz (the flatness band is
    # 50 Hz - 4 kHz, so the empty top does not look tonal)
    samples, rate = speech()
    upsampled = torchaudio.functional.resample(torch.from_numpy(samples), rate, 48000).numpy()
    sf.write(tmp_path / "clip.mp3", upsampled, 48000, format="MP3")
    assert degenerate(audio_stats(tmp_path / "clip.mp3"), limits) is None


def test_each_kind_of_degenerate_audio_is_measured_and_named(tmp_path):
    paths, _ = degenerate_files(tmp_path)
    kinds = {name: degenerate(audio_stats(path), DegenerateLimits())
             for name, path in paths.items()}
    assert kinds["silence"][0] == "silent_audio" and "-200.0 dBFS" in kinds["silence"][1]
    # a full-scale sine sits at full scale 2.5% of the time, but is named for what it is
    assert kinds["tone"][0] == "tonal_audio"
    assert kinds["dc"][0] == "silent_audio"  # a DC offset carries no sound
    assert kinds["clipped"][0] == "clipped_audio" and "of samples at full scale" in \
        kinds["clipped"][1]
    kind, detail = kinds["half_tone"]
    assert kind == "tonal_audio" and "below -50 (preflight_min_flatness_db)" in detail
    # the thresholds are the yaml's: a looser limit lets the clipped speech through
    assert degenerate(audio_stats(paths["clipped"]), DegenerateLimits(max_clipped=0.5)) is None


def test_degenerate_training_audio_stops_the_run_or_is_skipped_with_its_value(
        synthetic_subset, tmp_path):
    paths, seconds = degenerate_files(tmp_path)

    def swap(rows):
        for row, path in zip(rows, paths.values(), strict=False):
            row.update(wav=str(path), duration=f"{seconds:.3f}")

    edit(synthetic_subset, "train", swap)
    with pytest.raises(PreflightError) as err:
        experiment(synthetic_subset, tmp_path / "run")
    message = str(err.value)
    for kind in ("silent_audio", "clipped_audio", "tonal_audio"):
        assert kind in message
    assert "en_train_0000" in message and "preflight_min_level_dbfs" in message
    assert "--preflight=skip" in message
    exp = experiment(synthetic_subset, tmp_path / "skip", preflight="skip")
    report = (tmp_path / "skip" / "preflight_report.tsv").read_text(encoding="utf-8")
    dropped = {line.split("\t")[1] for line in report.splitlines()
               if line.split("\t")[2:3] in (["silent_audio"], ["clipped_audio"],
                                            ["tonal_audio"])}
    assert dropped == {f"en_train_000{i}" for i in range(5)}
    assert "-200.0 dBFS" in report and "% of samples at full scale" in report
    assert not dropped & set(exp.train.data_ids) and len(exp.train.data_ids) == 19


def test_audio_checks_are_cached_and_redone_for_a_changed_file(tmp_path, monkeypatch):
    samples, rate = speech()
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(a, samples, rate)
    sf.write(b, samples * 0.5, rate)
    cache = tmp_path / "cache" / "audio_checks.tsv"
    first = collect_stats([str(a), str(b)], cache)
    decoded = []
    monkeypatch.setattr(corpus_checks, "audio_stats",
                        lambda path: decoded.append(path) or audio_stats(path))
    assert collect_stats([str(a), str(b)], cache) == first and decoded == []
    sf.write(b, np.zeros_like(samples), rate)  # changed: decoded again
    again = collect_stats([str(a), str(b)], cache)
    assert decoded == [str(b)] and again[str(b)].level_dbfs == -200.0
    assert again[str(a)] == first[str(a)]


# ------------------------------------------------------------------ leakage
@pytest.mark.parametrize("kind", ["shared_id", "shared_audio", "same_audio"])
def test_training_utterances_leaked_into_test_stop_or_are_dropped_from_train(
        synthetic_subset, tmp_path, kind):
    train = read(synthetic_subset / "en" / "train.csv")

    def leak(rows):
        if kind == "shared_id":  # the same ID on another recording
            rows[0]["ID"] = train[3]["ID"]
        elif kind == "shared_audio":  # the training file itself, reached through a link
            (tmp_path / "link").symlink_to(SYNTHETIC / "en" / "wav")
            rows[0]["wav"] = str(tmp_path / "link" / "en_train_0003.flac")
        else:  # a WAV copy of the training FLAC: other bytes, the same samples
            samples, rate = sf.read(train[3]["wav"], dtype="int16")
            sf.write(tmp_path / "copy.wav", samples, rate, subtype="PCM_16")
            rows[0]["wav"] = str(tmp_path / "copy.wav")
        if kind != "shared_id":
            rows[0]["duration"] = train[3]["duration"]

    test = edit(synthetic_subset, "test", leak)
    with pytest.raises(PreflightError) as err:
        experiment(synthetic_subset, tmp_path / "run")
    assert f"{kind}: 1 utterance(s), e.g. train/en_train_0003" in str(err.value)
    assert f"test/{test[0]['ID']}" in str(err.value) or kind == "shared_id"
    exp = experiment(synthetic_subset, tmp_path / "skip", preflight="skip")
    assert "en_train_0003" not in exp.train.data_ids and len(exp.train.data_ids) == 23
    assert test[0]["ID"] in exp.tests["test"].data_ids  # the test set is scored whole
    report = (tmp_path / "skip" / "preflight_report.tsv").read_text(encoding="utf-8")
    assert f"train\ten_train_0003\t{kind}\t" in report


def test_valid_utterances_in_the_test_set_stop_even_with_skip(synthetic_subset, tmp_path):
    valid = read(synthetic_subset / "en" / "valid.csv")
    edit(synthetic_subset, "test", lambda rows: rows[1].update(wav=valid[2]["wav"],
                                                               duration=valid[2]["duration"]))
    with pytest.raises(PreflightError, match=rf"(?s)shared_audio: 1 utterance\(s\), e\.g\. "
                                             rf"valid/{valid[2]['ID']}.*never skipped"):
        experiment(synthetic_subset, tmp_path / "run", preflight="skip")


def test_a_shared_transcript_is_a_warning_and_a_clean_corpus_gives_none(
        synthetic_subset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        experiment(synthetic_subset, tmp_path / "clean")
    assert "pre-flight" not in caplog.text  # the clean subset: no new warning
    cache = read(synthetic_subset / "en" / "audio_checks.tsv", "\t")  # beside the manifests
    assert len(cache) == 36 and all(float(r["level_dbfs"]) > -30 for r in cache)
    caplog.clear()
    train = read(synthetic_subset / "en" / "train.csv")
    edit(synthetic_subset, "test", lambda rows: rows[0].update(wrd=train[5]["wrd"].upper()))
    with caplog.at_level(logging.WARNING):
        exp = experiment(synthetic_subset, tmp_path / "run")
    assert "1 valid/test utterance(s) with the transcript of a training utterance" in caplog.text
    report = (tmp_path / "run" / "preflight_report.tsv").read_text(encoding="utf-8")
    assert "\tshared_transcript\tthe transcript of train/" in report
    assert len(exp.train.data_ids) == 24  # nothing dropped for a warning


def test_without_audio_checks_ids_and_paths_are_still_compared(synthetic_subset, tmp_path):
    paths, seconds = degenerate_files(tmp_path)
    edit(synthetic_subset, "train", lambda rows: rows[0].update(wav=str(paths["silence"]),
                                                                duration=f"{seconds:.3f}"))
    train = read(synthetic_subset / "en" / "train.csv")
    edit(synthetic_subset, "valid", lambda rows: rows[0].update(wav=train[4]["wav"],
                                                                duration=train[4]["duration"]))
    with pytest.raises(PreflightError) as err:
        experiment(synthetic_subset, tmp_path / "run", preflight_audio_checks=False)
    assert "shared_audio" in str(err.value) and "silent_audio" not in str(err.value)
    assert not (synthetic_subset / "en" / "audio_checks.tsv").exists()


# ------------------------------------------------------------------ event tags
def test_event_tags_are_whole_bracketed_tokens():
    tags = EventTags()
    assert tags.find("hello [noise] world <laughter>, <unk>") == ["[noise]", "<laughter>",
                                                                  "<unk>"]
    assert tags.find("a < b > c, x[1] y, (inaudible), [ spaced ]") == []
    assert tags.apply("[background noise] so <laughter> it was") == "so it was"
    assert EventTags("keep").apply("so [noise] it") == "so [noise] it"
    assert EventTags("map", token="noise").apply("[noise] so <breath> it") == "noise so noise it"
    assert EventTags("drop", "[]<>()").apply("so (inaudible) it") == "so it"
    with pytest.raises(ValueError, match="event_tag_token"):
        EventTags("map")
    with pytest.raises(ValueError, match=r"'<n>' becomes 'n' in the 'en' normaliser"):
        EventTags("map", token="<n>").check_token("en")


@pytest.mark.parametrize("policy, prefix", [("drop", ""), ("keep", "noise "),
                                            ("map", "xnoise ")])
def test_event_tags_reach_targets_and_references_alike(synthetic_subset, tmp_path, caplog,
                                                       policy, prefix):
    def tag(rows):
        rows[0]["wrd"] = "[noise] " + rows[0]["wrd"]
        rows[1]["wrd"] += " <laughter>"

    train, test = edit(synthetic_subset, "train", tag), edit(synthetic_subset, "test", tag)
    with caplog.at_level(logging.WARNING):
        exp = experiment(synthetic_subset, tmp_path / policy, event_tags=policy,
                         event_tag_token="xnoise" if policy == "map" else None)
    for rows, data, key in ((train, exp.train.data, "target"),
                            (test, exp.tests["test"].data, "words")):
        assert data[rows[0]["ID"]][key] == prefix + NORM(rows[0]["wrd"].removeprefix("[noise] "))
        laughter = {"drop": "", "keep": " laughter", "map": " xnoise"}[policy]
        assert data[rows[1]["ID"]][key] == NORM(rows[1]["wrd"][:-len(" <laughter>")]) + laughter
    assert "4 event tag(s) in 4 transcript(s)" in caplog.text
    assert "[noise] x2, <laughter> x2" in caplog.text


def test_parenthesised_text_is_kept_and_named_and_tag_only_transcripts_are_empty(
        synthetic_subset, tmp_path, caplog):
    edit(synthetic_subset, "train", lambda rows: rows[2].update(wrd="(inaudible) " +
                                                                rows[2]["wrd"]))
    valid = edit(synthetic_subset, "valid", lambda rows: rows[0].update(wrd="[noise]"))
    with caplog.at_level(logging.WARNING), pytest.raises(
            PreflightError, match=rf"(?s)empty_text: 1 utterance.*valid/{valid[0]['ID']} "
                                  r"\('' after dropping event tags \['\[noise\]'\]\).*only "
                                  r"event tags"):
        experiment(synthetic_subset, tmp_path / "run")
    assert f"held only tags, e.g. valid/{valid[0]['ID']}" in caplog.text
    assert "1 transcript(s) hold parenthesised text, kept as words, e.g. train/en_train_0002: " \
           "'(inaudible)'" in caplog.text


# ------------------------------------------------------------------ durations
def test_durations_in_milliseconds_name_the_limits_and_the_range(synthetic_subset, tmp_path):
    def to_ms(rows):
        for row in rows:
            row["duration"] = str(round(float(row["duration"]) * 1000))

    rows = edit(synthetic_subset, "train", to_ms)
    lengths = sorted(float(r["duration"]) for r in rows)
    with pytest.raises(PreflightError) as err:
        experiment(synthetic_subset, tmp_path / "run", min_duration=0.5, max_duration=20.0)
    message = str(err.value)
    assert "every one of its 24 rows is outside the duration limits [0.5, 20] s" in message
    assert f"from {lengths[0]:g} to {lengths[-1]:g} s" in message
    assert "look like milliseconds" in message


def test_one_duration_in_milliseconds_is_named_as_such(synthetic_subset, tmp_path, caplog):
    """One row in milliseconds among seconds: left out of training as outside the limits (as
    before), and the log and the report now say it looks like milliseconds."""
    def one_to_ms(rows):
        rows[3]["duration"] = str(round(float(rows[3]["duration"]) * 1000))

    rows = edit(synthetic_subset, "train", one_to_ms)
    with caplog.at_level(logging.WARNING):
        experiment(synthetic_subset, tmp_path / "run", min_duration=0.5, max_duration=20.0)
    assert f"1 training duration(s) look like milliseconds, e.g. {rows[3]['ID']}: " \
           f"{float(rows[3]['duration']):g} s" in caplog.text
    report = (tmp_path / "run" / "preflight_report.tsv").read_text(encoding="utf-8")
    assert f"train\t{rows[3]['ID']}\toutside_duration_limits\t" in report
    assert "milliseconds?" in report
