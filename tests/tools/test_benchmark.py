"""tools/benchmark.py runs a recipe's real step beside the plain transformers loop and reports."""

import json
import subprocess
import sys

from fakes import REPO


def test_benchmark_runs_two_steps_on_cpu_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--model", "wavlm-tiny",
           "--variants", "hf,sdpa,lora+gc", "--steps", "2", "--warmup", "1", "--device", "cpu",
           "--no_shape_warmup",
           "--out", str(out), "--workdir", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["hf", "sdpa", "lora+gc"]
    for row in rows:
        assert row["steps"] == 2 and row["audio_s_per_s"] > 0 and row["tflops"] > 0
        assert 0 <= row["padding_mean"] < 0.5 and row["speech_s_per_batch"] > 0
    assert rows[1]["loader_speech_s_per_s"] > 0 and rows[1]["attention"] == "sdpa"
    # both loops do the same work on the same batches: FLOPs per speech second agree
    assert abs(rows[0]["gflop_per_speech_s"] / rows[1]["gflop_per_speech_s"] - 1) < 0.05
    table = (out / "results.md").read_text()
    assert "| wavlm-tiny | hf |" in table and "| wavlm-tiny | sdpa |" in table and "1.00x" in table


def test_benchmark_rejects_an_unknown_variant(tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--model", "wavlm-tiny",
           "--variants", "fast", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0 and "unknown variant 'fast'" in done.stderr
