"""The CommonVoice and CoRal recipes, each run end to end for a tiny epoch (subprocess, offline,
CPU) on a fake corpus in the real layout (mp3 clips + TSVs; parquet shards with audio bytes) with
micro models: every hparams file trains, validates, tests and writes its per-group table."""

import csv
import json
import re
import subprocess
import sys

import pytest
import torch
from fakes import (
    MICRO_ENCODER,
    REPO,
    VOCAB_960H,
    make_commonvoice_release,
    make_coral_snapshot,
    run_recipe,
)

CORAL = REPO / "recipes" / "CoRal"
COMMONVOICE = REPO / "recipes" / "CommonVoice"
# a micro model on a handful of clips: fp32 on CPU, no workers, small batches
QUICK = ["--precision=fp32", "--eval_precision=fp32", "--device=cpu", "--num_workers=0",
         "--grad_accumulation_factor=1", "--min_duration=0.5"]
TINY_ENCODER = ["--model=tiny:wavlm", f"--tiny_config={json.dumps(MICRO_ENCODER)}"]


def validations(out):
    """(epoch, step) of every validation in the run's log."""
    log = (out / "train_log.txt").read_text(encoding="utf-8")
    return [(int(e), int(s)) for e, s in re.findall(r"^epoch: (\d+), step: (\d+)", log, re.M)]


def group_table(out, split="test"):
    with open(out / f"wer_{split}_groups.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def coral_snapshot(tmp_path_factory):
    return make_coral_snapshot(tmp_path_factory.mktemp("coral"),
                               {"train": 24, "val": 6, "test": 6})


@pytest.mark.recipe
def test_coral_ctc_trains_by_steps_and_reports_per_dialect(coral_snapshot, tmp_path):
    out, prepared = tmp_path / "results", tmp_path / "prepared"
    proc = run_recipe(CORAL / "CTC", [
        "hparams/xls_r_300m_da.yaml", f"--data_folder={coral_snapshot}",
        f"--output_folder={out}", f"--manifest_folder={prepared}",
        *TINY_ENCODER, *QUICK,
        "--max_batch_seconds=8", "--total_steps=4", "--valid_every_steps=2",
        "--freeze_encoder_steps=2", "--lr=0.001",
        "--encoder_config_overrides={mask_time_length: 2}",
    ])
    assert re.search(r"test: WER \d+\.\d+%", proc.stdout), proc.stdout[-2000:]
    # training stopped at the step limit, validated at steps 2 and 4, and not twice at step 4
    assert [step for _, step in validations(out)] == [2, 4]
    assert json.loads((out / "run.json").read_text())["optimizer_step_limit"] == 4
    assert re.search("[æøå]", (out / "save" / "label_encoder.txt").read_text(encoding="utf-8"))
    groups = group_table(out)
    assert {(r["column"], r["value"]) for r in groups} >= {
        ("dialect", "Fynsk"), ("dialect", "Sønderjysk"), ("age_group", "0-24"),
        ("age_group", "25-49"), ("age_group", "50+"), ("gender", "female"), ("gender", "male")}
    assert sum(int(r["utterances"]) for r in groups if r["column"] == "dialect") == 6
    # the prepared folder (manifests + FLAC) is outside the run: the Whisper recipe reuses it
    assert len(list((prepared / "audio" / "train").glob("*.flac"))) == 24


@pytest.mark.recipe
def test_a_step_limit_apart_from_the_lr_schedule_is_refused(coral_snapshot, tmp_path):
    with pytest.raises(AssertionError, match=r"decays over 4 optimizer steps, but training "
                                             r"stops at optimizer_step_limit=3.*--total_steps"):
        run_recipe(CORAL / "CTC", [
            "hparams/xls_r_300m_da.yaml", f"--data_folder={coral_snapshot}",
            f"--output_folder={tmp_path / 'results'}", f"--manifest_folder={tmp_path / 'p'}",
            *TINY_ENCODER, *QUICK,
            "--total_steps=4", "--optimizer_step_limit=3"])


@pytest.fixture(params=["micro", "whisper_base"])
def multilingual_whisper(request):
    """A micro multilingual Whisper, and OpenAI's real whisper-base (packaged; its window cut
    to 8 s to keep the test short: the clips are under 3.5 s)."""
    if request.param == "micro":
        return [f"--model={request.getfixturevalue('micro_whisper_multi_dir')}"]
    request.getfixturevalue("whisper_base_dir")  # converted once per session
    return ["--model=packaged:whisper-base", "--window_seconds=8"]


@pytest.mark.recipe
def test_coral_whisper_trains_danish(coral_snapshot, tmp_path, multilingual_whisper):
    out = tmp_path / "results"
    proc = run_recipe(CORAL / "Whisper", [
        "hparams/whisper_small_da.yaml", f"--data_folder={coral_snapshot}",
        f"--output_folder={out}", f"--manifest_folder={tmp_path / 'prepared'}",
        *multilingual_whisper, *QUICK, "--batch_size=8", "--optimizer_step_limit=3",
        "--valid_every_steps=3", "--max_duration=3.5",
    ])
    assert re.search(r"test: WER \d+\.\d+%", proc.stdout), proc.stdout[-2000:]
    assert [step for _, step in validations(out)] == [3]
    assert {r["column"] for r in group_table(out)} == {"dialect", "gender", "age_group"}
    info = json.loads((out / "run.json").read_text())
    assert info["language"] == "da"


@pytest.mark.recipe
def test_coral_whisper_lora_trains_adapters_only(coral_snapshot, tmp_path,
                                                 micro_whisper_multi_dir):
    out = tmp_path / "results"
    run_recipe(CORAL / "Whisper", [
        "hparams/whisper_small_da_lora.yaml", f"--data_folder={coral_snapshot}",
        f"--output_folder={out}", f"--manifest_folder={tmp_path / 'prepared'}",
        f"--model={micro_whisper_multi_dir}", *QUICK, "--batch_size=8",
        "--optimizer_step_limit=3", "--valid_every_steps=3", "--max_duration=3.5",
    ])
    lora = json.loads((out / "run.json").read_text())["lora"]
    assert lora["where"] == "decoder" and lora["config"]["r"] == 32
    ckpt = next((out / "save").glob("CKPT+*"))
    saved = torch.load(ckpt / "whisper.ckpt")
    assert saved and all(".lora_" in k for k in saved)


# ---------------------------------------------------------------------------- CommonVoice
@pytest.fixture(scope="module")
def cv_releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    counts = {"train": 24, "dev": 6, "test": 6}
    return {lang: make_commonvoice_release(root, lang, counts) for lang in ("en", "da")}


@pytest.mark.recipe
def test_commonvoice_960h_keeps_its_vocabulary_head_and_exports_it(cv_releases, tmp_path,
                                                                   micro_ctc_960h_dir):
    out = tmp_path / "results"
    run_recipe(COMMONVOICE / "CTC", [
        "hparams/wav2vec2_large_960h_en.yaml", f"--data_folder={cv_releases['en']}",
        f"--output_folder={out}", f"--manifest_folder={tmp_path / 'prepared'}",
        f"--model={micro_ctc_960h_dir}", *QUICK, "--number_of_epochs=1",
        "--max_batch_seconds=8", "--augmenter=null",
        "--encoder_config_overrides={mask_time_length: 2}",
    ])
    labels = (out / "save" / "label_encoder.txt").read_text(encoding="utf-8")
    assert "'E' => 5" in labels and "' ' => 4" in labels and "'e'" not in labels
    text = (out / "wer_test.txt").read_text(encoding="utf-8")
    references = re.findall(r"^common_voice_en_test_\d+, %WER.*\n(.*)\n", text, re.M)
    words = [w for line in references for w in line.replace(";", " ").split() if w.isalpha()]
    assert len(references) == 6
    assert words and all(w.isupper() for w in words), text[:1500]  # upper case, like the head
    assert {r["column"] for r in group_table(out)} == {"gender", "age"}
    # the export writes the model's own vocabulary back: <pad> blank, | between words
    export = tmp_path / "export"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "checkpoints.py"), "export",
                           str(out), str(export)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert json.loads((export / "vocab.json").read_text()) == \
        {c: i for i, c in enumerate(VOCAB_960H)}
    processor = json.loads((export / "processor_config.json").read_text())
    assert processor["feature_extractor"]["return_attention_mask"] is False  # as trained


@pytest.mark.recipe
def test_commonvoice_xls_r_trains_a_new_danish_head(cv_releases, tmp_path):
    out = tmp_path / "results"
    proc = run_recipe(COMMONVOICE / "CTC", [
        "hparams/xls_r_300m.yaml", "--language=da", f"--data_folder={cv_releases['da']}",
        f"--output_folder={out}", f"--manifest_folder={tmp_path / 'prepared'}",
        *TINY_ENCODER, *QUICK, "--number_of_epochs=1",
        "--max_batch_seconds=8", "--freeze_encoder_steps=1", "--resample=once",
        "--prepare_workers=2", "--encoder_config_overrides={mask_time_length: 2}",
    ])
    assert re.search(r"test: WER \d+\.\d+%", proc.stdout), proc.stdout[-2000:]
    assert re.search("[æøå]", (out / "save" / "label_encoder.txt").read_text(encoding="utf-8"))
    # resample: once -> the manifests point at 16 kHz FLAC copies
    with open(tmp_path / "prepared" / "train.csv", newline="", encoding="utf-8") as f:
        assert all(r["wav"].endswith(".flac") for r in csv.DictReader(f))


@pytest.mark.recipe
def test_commonvoice_whisper_trains_danish(cv_releases, tmp_path, micro_whisper_multi_dir):
    out = tmp_path / "results"
    proc = run_recipe(COMMONVOICE / "Whisper", [
        "hparams/whisper_small.yaml", "--language=da", f"--data_folder={cv_releases['da']}",
        f"--output_folder={out}", f"--manifest_folder={tmp_path / 'prepared'}",
        f"--model={micro_whisper_multi_dir}", *QUICK, "--batch_size=8",
        "--number_of_epochs=1", "--max_duration=3.5",
    ])
    assert re.search(r"test: WER \d+\.\d+%", proc.stdout), proc.stdout[-2000:]
    assert {r["column"] for r in group_table(out)} == {"gender", "age"}
    assert json.loads((out / "run.json").read_text())["language"] == "da"
