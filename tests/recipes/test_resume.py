"""SIGKILL a real training run at several moments, rerun the same command each time, and check
that it finishes, that the kept best-WER checkpoint loads, and that it ends where an
uninterrupted run ends (same optimizer steps, the same metrics within tolerance)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from fakes import MICRO_ENCODER, REPO, SYNTHETIC, write_subset
from speechbrain.utils.checkpoints import Checkpointer

RECIPE = REPO / "recipes" / "Synthetic" / "CTC"


def command(data, out):
    return [sys.executable, "train.py", "hparams/wavlm_tiny.yaml", f"--data_folder={data}",
            f"--output_folder={out}", f"--tiny_config={json.dumps(MICRO_ENCODER)}",
            "--number_of_epochs=2", "--max_batch_seconds=8", "--valid_every_steps=2",
            "--num_workers=0", "--device=cpu", "--lr_encoder=0.003", "--lr_head=0.003",
            "--warmup_steps=5", "--num_to_keep=2"]


def run(data, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.run(command(data, out), cwd=RECIPE, env=env, capture_output=True,
                          text=True, timeout=900)


def validations(out):
    """``[(step, valid loss, valid WER)]`` from the run's log."""
    log = out / "train_log.txt"
    text = log.read_text(encoding="utf-8") if log.exists() else ""
    return [(int(s), float(loss), float(w)) for s, loss, w in
            re.findall(r"step: (\d+).*valid loss: ([\d.e+-]+).*valid WER: ([\d.e+-]+)", text)]


def final_test_wer(out):
    return float(re.search(r"test WER: ([\d.e+-]+)", (out / "train_log.txt").read_text())[1])


def kill_when(data, out, moment, ready):
    """Start the run, SIGKILL it as soon as ``ready()`` holds; False if it ended first."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.Popen(command(data, out), cwd=RECIPE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


@pytest.mark.recipe
def test_killed_at_six_moments_the_rerun_ends_like_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    write_subset(SYNTHETIC / "en", data / "en", {"train": 24, "valid": 6, "test": 6})
    whole = tmp_path / "whole"
    assert run(data, whole).returncode == 0
    reference = validations(whole)
    last_step = reference[-1][0]
    out = tmp_path / "killed"
    save = out / "save"

    def folders():
        return list(save.glob("CKPT+*")) if save.exists() else []

    seen = {}
    moments = {  # each later than the one before; checked every 20 ms
        "before any checkpoint (pre-flight written)":
            lambda: (out / "preflight_report.tsv").exists(),
        "while the first checkpoint is written": lambda: len(folders()) >= 1,
        "mid-epoch 1, after two validations": lambda: len(validations(out)) >= 2,
        "while a checkpoint is written": lambda: len(folders()) >= 1 and any(
            not (f / "CKPT.yaml").exists() for f in folders()),
        "in epoch 2": lambda: any(v[0] > reference[len(reference) // 2][0]
                                  for v in validations(out)),
        "after the last validation, while testing": lambda: any(
            v[0] == last_step for v in validations(out)),
    }
    for moment, ready in moments.items():
        seen[moment] = kill_when(data, out, moment, ready)
    done = run(data, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sum(seen.values()) >= 5, seen  # at least five kills landed before the run ended
    # the kept best-WER checkpoint is whole and loads
    best = Checkpointer(save).find_checkpoint(min_key="WER")
    assert best is not None and all(p.exists() for p in best.paramfiles.values())
    torch.load(best.paramfiles["encoder"], map_location="cpu")
    assert not [f for f in folders() if not (f / "CKPT.yaml").exists()]  # no torn folder left
    # it ended where the uninterrupted run ended: the same last optimizer step (no batch of an
    # epoch skipped or trained twice) and metrics within tolerance
    resumed = validations(out)
    assert resumed[-1][0] == last_step
    final = {step: (loss, wer) for step, loss, wer in resumed}[last_step]
    # the same batches in the same order with the same random draws: the valid loss after the
    # last step matches to float noise (a run that re-trained or skipped batches, or drew other
    # masks, is off by far more)
    assert final[0] == pytest.approx(reference[-1][1], rel=1e-3), (resumed, reference)
    assert abs(final[1] - reference[-1][2]) <= 5.0
    assert abs(final_test_wer(out) - final_test_wer(whole)) <= 5.0
    print(json.dumps({"kills": seen, "valid_loss_last": [reference[-1][1], final[0]],
                      "valid_WER_last": [reference[-1][2], final[1]],
                      "test_WER": [final_test_wer(whole), final_test_wer(out)]}))


@pytest.mark.recipe
def test_checkpoints_every_n_steps_without_validation_resume_mid_epoch(tmp_path):
    """`ckpt_interval_steps` (or `_minutes`): checkpoints inside an epoch without validating,
    saved only after an update (never between accumulated batches); killed after one, the rerun
    goes on from there and ends like the uninterrupted run."""
    data = tmp_path / "data"
    write_subset(SYNTHETIC / "en", data / "en", {"train": 24, "valid": 6, "test": 6})
    # every 3 batches with updates every 2: without the update rule it would save mid-update
    extra = ["--number_of_epochs=1", "--valid_every_steps=0", "--ckpt_interval_steps=3",
             "--grad_accumulation_factor=2"]

    def cmd(out):
        replaced = ("--number_of_epochs", "--valid_every_steps")
        return [a for a in command(data, out) if not a.startswith(replaced)] + extra

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    whole, out = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(cmd(whole), cwd=RECIPE, env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(cmd(out), cwd=RECIPE, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    intra = []
    while proc.poll() is None and not intra:
        intra = [c for c in (out / "save").glob("CKPT+*/CKPT.yaml")
                 if "brain_intra_epoch_ckpt" in c.read_text()]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert intra, "the run ended before its first interval checkpoint"
    done = subprocess.run(cmd(out), cwd=RECIPE, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert validations(out)[-1][:2] == validations(whole)[-1][:2]  # same step, same valid loss
