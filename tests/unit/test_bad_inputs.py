"""Bad inputs from the README's catalogue that no other test file covers: each stops with a
message naming the item and the fix, or is a documented skip listed in a report."""

import csv
import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from fakes import experiment
from test_preflight import check, clean_splits, make_wav

from speechtune.data import load_audio
from speechtune.models import normalize_per_utterance
from speechtune.preflight import PreflightError


# ---------------------------------------------------------------------------- audio
def tone(seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32")


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_any_sample_rate_is_resampled_to_the_models(tmp_path, rate):
    path = tmp_path / f"x{rate}.wav"
    sf.write(path, tone(1.5, rate), rate)
    sig = load_audio(str(path), 16000)
    assert sig.dtype == torch.float32 and abs(len(sig) - 24000) <= 1
    assert 0.25 < float(sig.abs().max()) < 0.35  # the tone, not silence or clipping


def test_stereo_is_mixed_down_and_integer_pcm_reads_like_float(tmp_path):
    left, right = tone(1.0, 16000), np.zeros(16000, dtype="float32")
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    assert torch.allclose(load_audio(str(tmp_path / "stereo.wav"), 16000),
                          torch.from_numpy(left / 2), atol=1e-6)
    sf.write(tmp_path / "int16.wav", left, 16000, subtype="PCM_16")
    sf.write(tmp_path / "float.wav", left, 16000, subtype="FLOAT")
    assert torch.allclose(load_audio(str(tmp_path / "int16.wav"), 16000),
                          load_audio(str(tmp_path / "float.wav"), 16000), atol=1 / 32768)


def test_nan_samples_stop_with_the_file_named(tmp_path):
    samples = tone(1.0, 16000)
    samples[100] = np.nan
    sf.write(tmp_path / "nan.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"nan.wav: the audio holds NaN or infinite samples; "
                                         r"re-encode"):
        load_audio(str(tmp_path / "nan.wav"), 16000)


def test_digital_silence_gives_finite_features(tmp_path):
    """Silence in valid/test is scored as is (the degenerate-audio check covers training
    utterances); it must not turn into NaN features (per-utterance normalisation divides by the
    standard deviation)."""
    sf.write(tmp_path / "silence.wav", np.zeros(16000, dtype="float32"), 16000)
    sig = load_audio(str(tmp_path / "silence.wav"), 16000)[None]
    feats = normalize_per_utterance(sig, torch.ones(1))
    assert torch.isfinite(feats).all() and float(feats.abs().max()) == 0.0


def test_an_empty_audio_file_is_named(tmp_path):
    splits = clean_splits(tmp_path)
    splits["valid"][0]["wav"] = make_wav(tmp_path / "empty.wav", 0.0)
    with pytest.raises(PreflightError, match=r"(?s)empty_audio: 1 utterance.*valid/v0.*"
                                             r"holds no samples"):
        check(splits)
    splits = clean_splits(tmp_path)
    splits["train"][0]["wav"] = make_wav(tmp_path / "empty.wav", 0.0)
    dropped = check(splits, mode="skip")  # training utterances can be skipped, and reported
    assert dropped["train"] == {"t0"}


# ---------------------------------------------------------------------------- text
@pytest.mark.parametrize("text", ["", "   ", "?! …", "-- --"])
def test_empty_or_punctuation_only_transcripts_are_named(tmp_path, text):
    splits = clean_splits(tmp_path)
    splits["test"][0].update(wrd=text, target="", words="")
    with pytest.raises(PreflightError, match=r"(?s)empty_text: 1 utterance.*test/s0.*"
                                             r"empty after the language's normaliser"):
        check(splits)


# ---------------------------------------------------------------------------- durations
def test_training_utterances_outside_the_duration_limits_are_listed(synthetic_subset, tmp_path,
                                                                     caplog):
    """A 0.05 s clip and clips over max_duration are left out of training, listed in the
    pre-flight report and counted in the log (valid/test are scored whole)."""
    train_csv = synthetic_subset / "en" / "train.csv"
    with open(train_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    sf.write(tmp_path / "blip.wav", tone(0.05, 16000), 16000)
    rows.append({**rows[0], "ID": "blip", "duration": "0.050", "wav": str(tmp_path / "blip.wav")})
    with open(train_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    longest = max(float(r["duration"]) for r in rows)
    limit = sorted(float(r["duration"]) for r in rows)[-3]  # the two longest are over it
    with caplog.at_level(logging.WARNING, logger="speechtune.recipe"):
        exp = experiment(synthetic_subset, tmp_path / "run", min_duration=0.5,
                         max_duration=limit)
    report = (tmp_path / "run" / "preflight_report.tsv").read_text(encoding="utf-8")
    listed = [line.split("\t")[1] for line in report.splitlines()
              if "\toutside_duration_limits\t" in line]
    assert "blip" in listed and len(listed) == 3, report
    assert f"{longest:.3f} s, not within [0.5, {limit}]" in report
    assert "3 training utterance(s) outside min_duration" in caplog.text
    assert "blip" not in exp.train.data_ids
