"""Two processes (torchrun, gloo on CPU) train the Synthetic CTC and Whisper recipes: the
training batches are shared out so each process trains about half of them, only the first
process writes logs, checkpoints and test files, and the result is in line with one process."""

import json
import os
import re
import subprocess
import sys

import pytest
from fakes import MICRO_ENCODER, MICRO_WHISPER, REPO, SYNTHETIC, write_subset
from speechbrain.dataio.sampler import DistributedSamplerWrapper

from speechtune import data


def test_ddp_shares_out_the_duration_batches_each_utterance_once(tmp_path):
    """SpeechBrain wraps the duration-budget batch sampler in a DistributedSampler: the two
    processes' batches cover every training utterance; DistributedSampler pads an odd number of
    batches to equal shares, so at most one batch is trained twice per epoch."""
    rows = data.read_manifest(SYNTHETIC / "en" / "train.csv", SYNTHETIC)
    dataset = data.make_dataset(dict(list(rows.items())[:120]), sort_by_duration=False)
    for epoch in (1, 2):
        seen = []
        for rank in (0, 1):
            sampler = data.dynamic_batch_sampler(dataset, 20, 10, shuffle=True, seed=1986,
                                                 max_batch_ex=32)
            wrapper = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=True)
            wrapper.set_epoch(epoch)
            seen.append([batch for batch in wrapper])
        assert abs(len(seen[0]) - len(seen[1])) == 0
        ids = [dataset.data_ids[i] for batches in seen for batch in batches for i in batch]
        assert set(ids) == set(dataset.data_ids)
        largest = max(len(b) for batches in seen for b in batches)
        assert len(ids) - len(set(ids)) <= largest


def torchrun(recipe, args, nproc):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 "--standalone"] if nproc > 1 else [sys.executable])
    done = subprocess.run([*launcher, "train.py", *args, "--device=cpu",
                           *(["--distributed_backend=gloo"] if nproc > 1 else [])],
                          cwd=recipe, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done


def log_lines(out):
    text = (out / "train_log.txt").read_text(encoding="utf-8")
    valid = re.findall(r"^epoch: (\d+), step: (\d+).*valid loss: ([\d.e+-]+)", text, re.M)
    return [(int(e), int(s), float(v)) for e, s, v in valid], text


@pytest.mark.recipe
@pytest.mark.parametrize("family", ["CTC", "Whisper", "Whisper-LoRA"])
def test_two_processes_train_half_the_steps_and_only_rank_0_writes(tmp_path, family):
    """Whisper-LoRA: adapters in encoder and decoder, with gradient checkpointing (transformers'
    non-reentrant one, which SpeechBrain's wrappers turn off "for DDP")."""
    data_dir = tmp_path / "data"
    write_subset(SYNTHETIC / "en", data_dir / "en", {"train": 32, "valid": 6, "test": 6})
    recipe = REPO / "recipes" / "Synthetic" / family.split("-")[0]
    if family == "CTC":
        args = ["hparams/wavlm_tiny.yaml", f"--tiny_config={json.dumps(MICRO_ENCODER)}",
                "--max_batch_seconds=8"]
    else:
        args = ["hparams/whisper_tiny.yaml", f"--tiny_config={json.dumps(MICRO_WHISPER)}",
                "--max_batch_seconds=8"]
    if family == "Whisper-LoRA":
        args += ["--lora=both", "--lr=0.01", "--gradient_checkpointing=True"]
    args += [f"--data_folder={data_dir}", "--number_of_epochs=2", "--num_workers=0",
             "--num_to_keep=1"]
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        torchrun(recipe, [*args, f"--output_folder={out}"], nproc)
        runs[nproc] = out
    one, _ = log_lines(runs[1])
    two, text = log_lines(runs[2])
    assert [e for e, _, _ in two] == [1, 2]  # one log line per validation: rank 0 writes alone
    assert text.count("split: test") == 1
    steps_one, steps_two = one[0][1], two[0][1]
    assert steps_one / 2 <= steps_two <= steps_one / 2 + 1  # each process trains half the batches
    for name in ("wer_test.txt", "curves.png", "run.json", "wer_test_groups.md"):
        assert (runs[2] / name).exists(), name
    assert "%WER" in (runs[2] / "wer_test.txt").read_text()
    kept = list((runs[2] / "save").glob("CKPT+*"))
    assert 1 <= len(kept) <= 2 and all((k / "CKPT.yaml").exists() for k in kept)
    assert all((k / "rng.rank1.ckpt").exists() for k in kept)  # each process's generators
    # rerun with one more epoch: both processes resume (each from its own generators' states)
    more = [a for a in args if not a.startswith("--number_of_epochs")] + ["--number_of_epochs=3"]
    torchrun(recipe, [*more, f"--output_folder={runs[2]}"], 2)
    resumed, _ = log_lines(runs[2])
    assert [e for e, _, _ in resumed] == [1, 2, 3] and resumed[2][1] == 3 * two[0][1]
    # the same model trained on the same data: the valid loss is in line with one process
    # (two processes average two batches' gradients per update, so the paths differ a little)
    assert two[-1][2] == pytest.approx(one[-1][2], rel=0.25), (one, two)
