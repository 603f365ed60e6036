"""tools/benchmark_decoding.py grid: synthetic log-probs that spell their sentences, the tuning
grid over them with the compiled decoder, and SpeechBrain's searcher on a sample."""

import json
import subprocess
import sys

from fakes import REPO, SYNTHETIC

from speechtune.ngram import build_lm, read_sentences


def run_grid(tmp_path, confusions):
    arpa = tmp_path / "lm.arpa"
    if not arpa.exists():
        build_lm(read_sentences([SYNTHETIC / "en" / "train.csv"], "en"), 3, [0], arpa)
    out = tmp_path / f"grid_{confusions}.jsonl"
    cmd = [sys.executable, str(REPO / "tools" / "benchmark_decoding.py"), "grid", "--lm",
           str(arpa), "--utterances", "6", "--workers", "2", "--alpha_grid", "0", "1",
           "--beta_grid", "0", "--confusions", str(confusions), "--speechbrain_sample", "2",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 2 points x 6 utt. | 2 |" in done.stdout
    return json.loads(out.read_text())


def test_the_grid_decodes_synthetic_log_probs_that_spell_their_sentences(tmp_path):
    clean = run_grid(tmp_path, 0.0)
    assert clean["points"] == 2 and clean["utterances"] == 6
    assert 8 < clean["mean_seconds_audio"] < 20  # LibriSpeech-like, not the bundled 1.5-3.5 s
    assert clean["greedy_WER"] == 0 and clean["best"]["WER"] == 0
    noisy = run_grid(tmp_path, 0.1)
    # letters heard as others: greedy errs; the lexicon and LM (of these very sentences) mend it
    assert noisy["greedy_WER"] > 20 and noisy["best"]["WER"] < noisy["greedy_WER"] / 2
    assert noisy["speechbrain_sample"]["utterances"] == 2
    assert noisy["speechbrain_sample"]["utt_per_s"] > 0 < noisy["flashlight_sample"]["utt_per_s"]
