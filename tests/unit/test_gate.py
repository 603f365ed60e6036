"""The robustness gate: non-speech clips, loop detection, the verdict against the base model, and
the gate run in-process on a micro model the way train.py runs it."""

import json

import numpy as np
import pytest
import soundfile as sf
from fakes import experiment

from speechtune import gate
from speechtune.corpus_checks import audio_stats
from speechtune.gate import (
    GateError,
    has_loop,
    make_clips,
    make_long_recording,
    numbers,
    verdict,
)


def test_the_clips_are_seeded_non_speech_of_the_asked_length(tmp_path):
    paths = make_clips(tmp_path / "a", 16000, 2.0)
    again = make_clips(tmp_path / "b", 16000, 2.0)
    assert sorted(paths) == ["brown_noise", "hum", "music", "pink_noise", "silence",
                             "white_noise"]
    for name, path in paths.items():
        samples, rate = sf.read(path)
        assert rate == 16000 and len(samples) == 32000
        assert np.array_equal(samples, sf.read(again[name])[0])  # the same every time
    levels = {name: audio_stats(path) for name, path in paths.items()}
    assert levels["silence"].level_dbfs == -200.0
    assert -35 < levels["white_noise"].level_dbfs < -25 and levels["white_noise"].flatness_db > -5
    assert levels["hum"].flatness_db < -40 and levels["music"].flatness_db < -20


@pytest.mark.parametrize("text, looped", [
    ("the the the", True), ("i am i am i am here", True), ("a b c d a b c d a b c d", True),
    ("thank you thank you", False), ("the cat sat on the mat", False), ("", False),
    ("a b c d e a b c d e a b c d e", False),  # a 5-gram is beyond MAX_NGRAM
])
def test_a_loop_is_an_ngram_repeated_three_times_in_a_row(text, looped):
    assert has_loop(text.split()) is looped


def numbers_of(words_per_clip, test_texts):
    return numbers({f"clip{i}": " ".join(["w"] * n) for i, n in enumerate(words_per_clip)},
                   6.0, test_texts)


def test_a_model_that_loops_and_babbles_fails_and_the_base_model_passes():
    base = numbers_of([0, 0, 1, 0], {"a": "hello there", "b": "good morning"})
    looping = numbers_of([0, 12, 30, 6], {"a": "hello hello hello hello", "b": "good morning",
                                          "c": "j'j'j'j'j'"})  # one "word" to a normaliser
    assert base.insertions_per_minute == pytest.approx(1 / 0.4)  # 1 word in 4 x 6 s
    assert looping.loop_rate == pytest.approx(200 / 3) and looping.looped == ["a", "c"]
    assert looping.clips_looped == ["clip1", "clip2", "clip3"] and base.clips_looped == []
    assert verdict(base, base, 0.0, 0.0) == []  # the base model against itself passes
    failures = verdict(base, looping, 5.0, 10.0)
    assert len(failures) == 2
    assert "words per minute of non-speech 2.5 -> 120.0 (+117.5; gate_max_insertions_rise=5)" \
        in failures[0]
    assert "test hypotheses in a loop 0.0% -> 66.7% (+66.7 points; gate_max_loop_rise=10), " \
           "e.g. a, c" in failures[1]
    assert verdict(base, looping, None, None) == []  # no limits: a report only


def test_without_base_test_hypotheses_loops_are_reported_not_judged(tmp_path):
    base = numbers_of([0], None)
    tuned = numbers_of([0], {"a": "x x x"})
    assert base.loop_rate is None and verdict(base, tuned, None, 0.0) == []
    text = gate.report(base, tuned, tmp_path / "gate")
    assert "| test hypotheses in a loop (%) | - (no zero-shot test) | 100.0 (1 of 1) | - |" \
        in text
    assert json.loads((tmp_path / "gate.json").read_text())["tested"]["looped"] == ["a"]


def test_the_long_recording_is_the_test_utterances_with_pauses_cut_in_them(tmp_path):
    rate, tone = 16000, np.sin(np.arange(16000) / 3.0).astype("float32") * 0.5  # 1 s, no pause
    rows = {}
    for i in range(12):
        sf.write(tmp_path / f"u{i}.wav", tone, rate)
        rows[f"u{i}"] = {"wav": str(tmp_path / f"u{i}.wav"), "words": f"word{i} w"}
    info = make_long_recording(tmp_path / "a", rows, rate, seconds=10, window_seconds=4.0)
    assert info == make_long_recording(tmp_path / "b", rows, rate, 10, 4.0)  # seeded
    long, _ = sf.read(tmp_path / "a" / "long.wav")
    assert 10 <= info["seconds"] == len(long) / rate < 10 + 1 + 1.5
    assert info["reference"] == " ".join(f"word{i} w" for i in range(info["utterances"]))
    ends = [end for _, end in info["chunks"]]
    assert ends[-1] == info["seconds"] and len(ends) >= 3
    for k, (start, end) in enumerate(info["chunks"]):
        assert 0 < end - start <= 4.0
        chunk, _ = sf.read(tmp_path / "a" / f"long_{k:03d}.wav")
        assert np.array_equal(chunk, long[round(start * rate):round(end * rate)])
        if end < info["seconds"]:  # every cut falls in a pause, never in an utterance
            assert np.all(long[round(end * rate) - 100:round(end * rate) + 100] == 0)
    with pytest.raises(ValueError, match="gate_long_seconds=0"):
        make_long_recording(tmp_path / "c", {"x": {**rows["u0"], "words": ""}}, rate, 1, 4.0)


def test_the_long_recording_counts_deleted_words_against_the_base_model():
    base = numbers({"c": ""}, 6.0, None, ("a b c d e f g h i j", "a b c d e f g h i j"))
    stops = numbers({"c": ""}, 6.0, None, ("a b c d e f g h i j", "a b c x"))
    silent = numbers({"c": ""}, 6.0, None, ("a b c d", ""))
    assert base.long_deletion_rate == 0.0 and base.long_wer == 0.0
    assert stops.long_deletion_rate == pytest.approx(60.0)  # 6 of 10 words missing
    assert stops.long_wer == pytest.approx(70.0)  # and one substituted
    assert silent.long_deletion_rate == 100.0 and silent.long_wer == 100.0
    assert verdict(base, stops, None, None, 50.0) == [
        "words deleted on the long recording 0.0% -> 60.0% (+60.0 points; "
        "gate_max_deletion_rise=50)"]
    assert verdict(base, stops, None, None, 60.0) == []
    assert numbers({"c": ""}, 6.0, None).long_deletion_rate is None  # no long recording
    assert verdict(numbers({"c": ""}, 6.0, None), stops, None, None, 0.0) == []


def test_the_gate_runs_on_a_micro_model_as_train_py_runs_it(synthetic_subset, tmp_path):
    out = tmp_path / "run"
    exp = experiment(synthetic_subset, out, robustness_gate=True, gate_clip_seconds=2.0,
                     zero_shot=True)
    hparams = exp.brain.hparams.__dict__
    exp.zero_shot()
    base = gate.base_numbers(exp, hparams)
    saved = json.loads((out / "gate_base.json").read_text())
    assert {clip: len(text.split()) for clip, text in saved["clips"].items()} == base.words
    reference = json.loads((out / "gate" / "long.json").read_text())["reference"]
    assert saved["long"][0] == reference and base.long_deletion_rate is not None
    assert gate.base_numbers(exp, hparams) == base  # from the file: the same numbers
    exp.fit()
    exp.evaluate()
    again, tuned, text = gate.check(exp, hparams, base)
    assert again is base and set(tuned.words) == set(base.words)
    # the words counted are those the test stage wrote for the clips
    with open(out / "wer_gate_nonspeech.txt", encoding="utf-8") as f:
        assert "gate_silence" in f.read()
    assert tuned.hypotheses == 6 and base.hypotheses == 6  # the test split, both models
    chunks = json.loads((out / "gate" / "long.json").read_text())["chunks"]
    with open(out / "hyps_gate_long.tsv", encoding="utf-8") as f:  # each chunk decoded
        assert len(f.read().splitlines()) == 1 + len(chunks)
    assert tuned.long_wer is not None and "| long recording: WER (%) |" in text
    assert (out / "gate.md").read_text() == text
    with pytest.raises(GateError, match=r"(?s)robustness gate failed.*gate_max_insertions_rise"
                                        r"=-1.*test results are written"):
        gate.check(exp, {**hparams, "gate_max_insertions_rise": -1.0}, base)
