"""Pre-flight validation: each failure stops the run with a message naming the items and the fix."""

import re
import shutil
import unicodedata

import numpy as np
import pytest
import soundfile as sf

from speechtune.preflight import (
    PreflightError,
    ctc_label_check,
    ctc_min_frames,
    run_preflight,
    seq2seq_label_check,
    speed_length_factors,
)
from speechtune.text import get_normalizer

NORM = get_normalizer("en")
VOCAB = set("abcdefghijklmnopqrstuvwxyz' ")


def frames(seconds):  # 20 ms frames, like WavLM
    return int(seconds * 50)


def make_wav(path, seconds, sr=16000):
    sf.write(path, np.zeros(int(seconds * sr), dtype="float32") + 0.01, sr)
    return str(path)


def rows_for(tmp_path, texts, seconds=1.0, prefix="u"):
    rows = []
    for i, text in enumerate(texts):
        wav = make_wav(tmp_path / f"{prefix}{i}.wav", seconds)
        rows.append({"ID": f"{prefix}{i}", "duration": str(seconds), "wav": wav, "wrd": text,
                     "target": NORM(text)})
    return rows


def clean_splits(tmp_path):
    return {"train": rows_for(tmp_path, ["hello world"], prefix="t"),
            "valid": rows_for(tmp_path, ["a cat"], prefix="v"),
            "test": rows_for(tmp_path, ["the dog"], prefix="s")}


def check(splits, **kw):
    return run_preflight(splits, VOCAB, ctc_label_check(frames), **kw)


def test_clean_data_passes(tmp_path):
    assert check(clean_splits(tmp_path)) == {"train": set(), "valid": set(), "test": set()}


def test_missing_audio_is_named(tmp_path):
    splits = clean_splits(tmp_path)
    splits["train"][0]["wav"] = str(tmp_path / "nope.flac")
    with pytest.raises(PreflightError, match=r"(?s)missing_audio: 1 utt.*train/t0.*nope\.flac.*"
                                             r"fix: check the manifest's audio path"):
        check(splits)


def test_unreadable_audio_is_named(tmp_path):
    splits = clean_splits(tmp_path)
    bad = tmp_path / "corrupt.flac"
    bad.write_bytes(b"this is not audio" * 10)
    splits["valid"][0]["wav"] = str(bad)
    with pytest.raises(PreflightError, match=r"(?s)unreadable_audio.*valid/v0.*re-encode"):
        check(splits)


def test_duration_mismatch_is_named(tmp_path):
    splits = clean_splits(tmp_path)
    splits["test"][0]["duration"] = "3.0"
    with pytest.raises(PreflightError,
                       match=r"(?s)duration_mismatch.*manifest 3\.000 s, audio 1\.000 s.*fix: "
                             r"correct the manifest's duration column, or delete it"):
        check(splits)


def test_more_labels_than_frames_is_named(tmp_path):
    splits = clean_splits(tmp_path)
    splits["train"] += rows_for(tmp_path, ["a very long sentence " * 5], seconds=0.5, prefix="L")
    with pytest.raises(PreflightError, match=r"(?s)too_many_labels.*train/L0.*frames"):
        check(splits)


def test_repeated_characters_need_a_blank_between_them():
    assert ctc_min_frames(list("abc")) == 3
    assert ctc_min_frames(list("aab")) == 4  # a <blank> a b
    assert ctc_min_frames(list("hello")) == 6


def test_case_mismatch_with_uppercase_vocabulary_is_caught(tmp_path):
    """The seed report's failure: lower-case text against an upper-case vocabulary."""
    splits = clean_splits(tmp_path)
    upper_vocab = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    with pytest.raises(PreflightError, match=r"(?s)valid: .*not in the vocabulary.*Fix: normalise"):
        run_preflight(splits, upper_vocab, ctc_label_check(frames))


def test_a_few_oov_characters_below_threshold_pass(tmp_path):
    splits = clean_splits(tmp_path)
    splits["valid"] = rows_for(tmp_path, ["zoë " + "the cat sat on the mat " * 9], seconds=8.0,
                               prefix="v")
    assert check(splits, max_oov_rate=0.01)["valid"] == set()
    with pytest.raises(PreflightError, match="ë"):
        check(splits, max_oov_rate=0.001)


def test_long_valid_test_transcripts_are_scored_not_flagged(tmp_path):
    splits = clean_splits(tmp_path)
    splits["test"] += rows_for(tmp_path, ["a very long sentence " * 5], seconds=0.5, prefix="L")
    assert check(splits)["test"] == set()


def test_skip_mode_never_drops_valid_or_test(tmp_path):
    splits = clean_splits(tmp_path)
    splits["valid"][0]["wav"] = str(tmp_path / "gone.flac")
    with pytest.raises(PreflightError, match=r"(?s)valid/v0.*never skipped"):
        check(splits, mode="skip")


def test_skip_mode_drops_and_reports(tmp_path):
    splits = clean_splits(tmp_path)
    splits["train"] += rows_for(tmp_path, ["fine"], prefix="ok")
    shutil.os.remove(splits["train"][0]["wav"])
    report = tmp_path / "report.tsv"
    dropped = check(splits, mode="skip", report_path=report)
    assert dropped == {"train": {"t0"}, "valid": set(), "test": set()}
    assert "t0\tmissing_audio" in report.read_text()


def test_empty_split_is_an_error(tmp_path):
    splits = clean_splits(tmp_path)
    splits["test"] = []
    with pytest.raises(PreflightError, match="Split 'test' is empty"):
        check(splits)


def test_training_labels_are_checked_against_speed_perturbed_length(tmp_path):
    splits = clean_splits(tmp_path)
    splits["train"] = rows_for(tmp_path, ["ab" * 22 + "c"], prefix="T")  # 45 labels, 50 frames
    assert check(splits)["train"] == set()
    with pytest.raises(PreflightError, match=r"(?s)too_many_labels.*train/T0"):
        run_preflight(splits, VOCAB, ctc_label_check(frames, speed_factor=0.85))  # 42 frames


def test_train_text_outside_a_reloaded_vocabulary_is_caught(tmp_path):
    splits = clean_splits(tmp_path)
    splits["train"] = rows_for(tmp_path, ["smörgåsbord"], prefix="T")
    with pytest.raises(PreflightError, match=r"(?s)train: .*not in the vocabulary"):
        check(splits)


# ---------------------------------------------------------------- Whisper-style checks
def seq2seq(window=2.0, max_tokens=20, speed_factor=1.0):
    return seq2seq_label_check(window, max_tokens, count_tokens=lambda t: len(t.split()) + 4,
                               speed_factor=speed_factor)


def test_audio_longer_than_the_whisper_window(tmp_path):
    splits = clean_splits(tmp_path)
    splits["train"] += rows_for(tmp_path, ["long one"], seconds=2.5, prefix="L")
    with pytest.raises(PreflightError, match=r"(?s)audio_too_long.*train/L0.*2\.50 s .*> 2 s"):
        run_preflight(splits, None, seq2seq())
    # a test utterance past the window is scored (cut audio, full reference) and reported
    splits["train"].pop()
    splits["test"] = rows_for(tmp_path, ["the dog"], seconds=2.5, prefix="s")
    report = tmp_path / "report.tsv"
    dropped = run_preflight(splits, None, seq2seq(), report_path=report)
    assert dropped["test"] == set()
    assert "s0\taudio_cut\t2.50 s > 2 s window" in report.read_text()


def test_valid_audio_beyond_a_shortened_window_stops_the_run(tmp_path):
    """A window cut below the model's own (window_seconds) would score long valid/test audio from
    its first seconds: fatal even with --preflight=skip, the longest utterance named first."""
    splits = clean_splits(tmp_path)
    splits["valid"] += rows_for(tmp_path, ["a b", "c d"], seconds=2.5, prefix="v")
    splits["valid"][-1]["duration"] = 2.8
    check = seq2seq_label_check(2.0, 20, count_tokens=lambda t: len(t.split()) + 4,
                                model_window_seconds=30.0)
    with pytest.raises(PreflightError, match=r"(?s)beyond_window: 2 utterance\(s\), e\.g\. "
                                             r"valid/v1 \(2\.80 s > window_seconds=2.*raise "
                                             r"window_seconds above the longest"):
        run_preflight(splits, None, check, mode="skip", duration_tolerance=1.0)


def test_whisper_training_checks_use_the_lengthening_speed(tmp_path):
    splits = clean_splits(tmp_path)
    splits["train"] = rows_for(tmp_path, ["fine"], seconds=1.9, prefix="T")
    assert run_preflight(splits, None, seq2seq())["train"] == set()
    dropped = run_preflight(splits, None, seq2seq(speed_factor=1.1), mode="skip")
    assert dropped["train"] == {"T0"}  # 2.09 s after speed perturbation to 110%


def test_too_many_decoder_tokens_is_named(tmp_path):
    splits = clean_splits(tmp_path)
    splits["train"] += rows_for(tmp_path, ["word " * 30], prefix="L")
    with pytest.raises(PreflightError, match=r"(?s)too_many_tokens.*train/L0.*34 tokens > 20"):
        run_preflight(splits, None, seq2seq())


def test_speed_length_factors_match_speechbrains_speed_perturbation():
    """The label checks bound lengths by what SpeedPerturb really does: speed 105 shortens to
    100/105, speed 95 lengthens to 100/95 (not 0.95 and 1.05)."""
    import torch
    from speechbrain.augment.time_domain import SpeedPerturb

    speeds = [90, 95, 100, 105, 110]
    lengths = {s: SpeedPerturb(16000, speeds=[s])(torch.zeros(1, 16000)).shape[1] / 16000
               for s in speeds}
    shortest, longest = speed_length_factors(speeds)
    assert (shortest, longest) == (100 / 110, 100 / 90)
    assert shortest == pytest.approx(min(lengths.values()), abs=1e-3)
    assert longest == pytest.approx(max(lengths.values()), abs=1e-3)


def test_a_folder_an_empty_file_and_a_symlink_loop_say_what_they_are(tmp_path):
    """Each used to read "not found" or "format not recognised", and then each got the fix of
    an undecodable file ("re-encode") or one naming an option new_recipe.py does not take."""
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    shutil.copy(clean_splits(tmp_path)["test"][0]["wav"], tmp_path / unicodedata.normalize(
        "NFD", "s\u00e5.wav"))
    expected = {"folder.wav": ("not_an_audio_file", "is a directory", "name an audio file"),
                "zero.wav": ("empty_audio", "is empty (0 bytes)", "the file holds no samples"),
                "loop.wav": ("broken_symlink", "is a symlink loop", "repair the link"),
                "dangling.wav": ("broken_symlink", f"is a symlink to a missing file "
                                                   f"{tmp_path / 'gone.wav'}", "repair the link"),
                "s\u00e5.wav": ("audio_name_form", "is not there as spelled",
                                "spell the name in the manifest as the file system does")}
    for name, (kind, phrase, fix) in expected.items():
        splits = clean_splits(tmp_path)
        splits["test"][0]["wav"] = str(tmp_path / name)
        with pytest.raises(PreflightError, match=rf"(?s){kind}: 1 utterance.*test/s0 "
                                                 rf"\({re.escape(str(tmp_path / name))} "
                                                 rf"{re.escape(phrase)}.*fix: {fix}") as err:
            check(splits)
        assert "re-encode" not in str(err.value) and "--data_folder" not in str(err.value)
