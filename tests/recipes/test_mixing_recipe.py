"""recipes/Danish/Whisper (whisper_small_da_mix.yaml): CoRal and CommonVoice Danish mixed by
weight, run end to end for a few steps (subprocess, offline, CPU) on the fake corpora with a
micro multilingual Whisper; each corpus prepared by its own preparation, validated pooled and
tested apart."""

import csv
import re

import pytest
from fakes import (
    REPO,
    SYNTHETIC,
    make_commonvoice_release,
    make_coral_snapshot,
    run_recipe,
    write_subset,
)

DANISH = REPO / "recipes" / "Danish" / "Whisper"
QUICK = ["--precision=fp32", "--eval_precision=fp32", "--device=cpu", "--num_workers=0",
         "--grad_accumulation_factor=1", "--min_duration=0.5", "--max_duration=3.5"]


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.recipe
def test_danish_mix_trains_on_coral_and_commonvoice_and_tests_each(tmp_path,
                                                                   micro_whisper_multi_dir):
    coral = make_coral_snapshot(tmp_path / "coral", {"train": 8, "val": 2, "test": 2})
    cv = make_commonvoice_release(tmp_path / "cv", "da", {"train": 6, "dev": 2, "test": 3})
    out, prepared = tmp_path / "results", tmp_path / "prepared"
    proc = run_recipe(DANISH, [
        "hparams/whisper_small_da_mix.yaml", f"--data_folder={tmp_path}",
        f"--coral_folder={coral}", f"--commonvoice_folder={cv}",
        f"--manifest_folder={prepared}", f"--output_folder={out}",
        f"--model={micro_whisper_multi_dir}", *QUICK, "--batch_size=4",
        "--mix_epoch_utterances=8", "--optimizer_step_limit=2", "--valid_every_steps=2",
        "--prepare_workers=1",
    ])
    # each corpus prepared in its own folder by its own preparation
    assert (prepared / "coral_read_aloud" / "train.csv").is_file()
    assert (prepared / "commonvoice_da" / "train.csv").is_file()
    assert "mixture: 8 utterances drawn per epoch in 2 batches from coral (weight 0.7, 8 " \
           "training utterances), cv_da (weight 0.3, 6 training utterances)" in \
        proc.stdout + proc.stderr
    # one test split per corpus, each scored alone; valid pools both
    for split, corpus, n in (("test_coral", "coral", 2), ("test_cv_da", "cv_da", 3)):
        assert re.search(rf"\] {split}: WER \d+\.\d+%", proc.stdout), proc.stdout[-2000:]
        scored = re.findall(r"^(\S+), %WER", (out / f"wer_{split}.txt").read_text(), re.M)
        assert len(scored) == n and all(u.startswith(f"{corpus}-") for u in scored)
        table = rows(out / f"wer_{split}_groups.csv")
        assert {(r["value"], r["utterances"]) for r in table if r["column"] == "corpus"} == \
            {(corpus, str(n))}
    valid = rows(out / "mixture" / "valid.csv")
    assert sorted({r["corpus"] for r in valid}) == ["coral", "cv_da"] and len(valid) == 4
    assert {r["utt_language"] for r in valid} == {"da"}


@pytest.mark.recipe
def test_synthetic_mix_decodes_each_corpus_in_its_language(tmp_path, micro_whisper_multi_dir):
    """whisper_base_mix.yaml (bundled Danish 0.7 + English 0.3) on subsets with a micro Whisper:
    the English corpus trains and is tested with <|en|>, the Danish one with <|da|>."""
    data = tmp_path / "data"
    write_subset(SYNTHETIC / "da", data / "da", {"train": 8, "valid": 2, "test": 2})
    write_subset(SYNTHETIC / "en", data / "en", {"train": 8, "valid": 2, "test": 2})
    out = tmp_path / "results"
    proc = run_recipe(REPO / "recipes" / "Synthetic" / "Whisper", [
        "hparams/whisper_base_mix.yaml", f"--data_folder={data}", f"--output_folder={out}",
        f"--model={micro_whisper_multi_dir}", "--number_of_epochs=1", "--zero_shot=False",
        "--device=cpu", "--window_seconds=4", "--mix_epoch_utterances=8", "--batch_size=4",
        "--eval_batch_size=4",
    ])
    for split in ("test_da", "test_en"):
        assert re.search(rf"\] {split}: WER \d+\.\d+%", proc.stdout), proc.stdout[-2000:]
    train = rows(out / "mixture" / "train.csv")
    assert {(r["corpus"], r["utt_language"]) for r in train} == {("da", "da"), ("en", "en")}
    for corpus in ("da", "en"):  # decoded after the corpus's language token
        with open(out / f"hyps_test_{corpus}.tsv", newline="", encoding="utf-8") as f:
            decoded = list(csv.DictReader(f, delimiter="\t"))
        assert len(decoded) == 2 and {r["language"] for r in decoded} == {corpus}
