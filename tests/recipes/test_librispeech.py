"""LibriSpeech preparation on a tree in the real on-disk layout, and its recipe on that tree."""

import csv
import json

import pytest
from fakes import MICRO_ENCODER, MICRO_WHISPER, REPO, fake_librispeech, run_recipe

from speechtune.prepare.librispeech import prepare_librispeech
from speechtune.tiny import build_tiny_whisper

RECIPE = REPO / "recipes" / "LibriSpeech" / "CTC"


def test_prepare_writes_the_manifest_contract(tmp_path):
    root = fake_librispeech(tmp_path / "LibriSpeech")
    out = prepare_librispeech(root, tmp_path / "csv", ["train-clean-100", "test-other"])
    rows = list(csv.DictReader(open(out["train-clean-100"], encoding="utf-8")))
    assert len(rows) == 24
    assert list(rows[0]) == ["ID", "duration", "wav", "spk_id", "wrd"]
    first = rows[0]
    assert first["ID"] == "100-7-0000" and first["spk_id"] == "100"
    assert first["wav"] == "$data_root/train-clean-100/100/7/100-7-0000.flac"
    assert first["wrd"].isupper() and float(first["duration"]) > 0.5
    assert len(list(csv.DictReader(open(out["test-other"], encoding="utf-8")))) == 4


def test_prepare_errors_name_the_problem(tmp_path):
    root = fake_librispeech(tmp_path / "LibriSpeech", {"dev-clean": ("valid", 2)})
    with pytest.raises(FileNotFoundError, match="train-clean-100 not found"):
        prepare_librispeech(root, tmp_path / "csv", ["train-clean-100"])
    with pytest.raises(ValueError, match="Unknown LibriSpeech split 'train-clean-99'"):
        prepare_librispeech(root, tmp_path / "csv", ["train-clean-99"])
    next((root / "dev-clean").rglob("*.flac")).unlink()
    with pytest.raises(FileNotFoundError, match="lists .* but .* does not exist"):
        prepare_librispeech(root, tmp_path / "csv", ["dev-clean"])


@pytest.mark.recipe
@pytest.mark.parametrize("yaml", ["wavlm_large.yaml", "wavlm_large_paper.yaml"])
def test_recipe_runs_one_tiny_epoch_on_the_fake_tree(tmp_path, yaml):
    root = fake_librispeech(tmp_path / "LibriSpeech")
    out = tmp_path / "results"
    proc = run_recipe(RECIPE, [
        f"hparams/{yaml}", f"--data_folder={root}", f"--output_folder={out}",
        "--model=tiny:wavlm", f"--tiny_config={json.dumps(MICRO_ENCODER)}",
        "--number_of_epochs=1", "--precision=fp32", "--eval_precision=fp32", "--device=cpu",
        "--max_batch_seconds=10", "--num_workers=0", "--valid_every_steps=2",
        "--grad_accumulation_factor=1",
        "--encoder_config_overrides={mask_time_length: 2, mask_feature_length: 4}",  # 32 channels
    ])
    assert "test-clean: WER" in proc.stdout and "test-other: WER" in proc.stdout
    for name in ("train_log.txt", "hyperparams.yaml", "wer_test-clean.txt", "wer_test-other.txt",
                 "curves.png", "manifests/train-clean-100.csv"):
        assert (out / name).exists(), name
    log = (out / "train_log.txt").read_text()
    assert log.count("valid WER") >= 2  # step-based validation plus the epoch end


@pytest.mark.recipe
@pytest.mark.parametrize("yaml", ["whisper_small_en.yaml", "whisper_small_en_lora.yaml"])
def test_whisper_recipe_runs_one_tiny_epoch_on_the_fake_tree(tmp_path, yaml):
    """whisper_small_en.yaml and its LoRA variant with a local tiny English-only Whisper in place
    of the hub id."""
    root = fake_librispeech(tmp_path / "LibriSpeech")
    texts = [line.split(" ", 1)[1].lower() for f in root.rglob("*.trans.txt")
             for line in f.read_text().splitlines()]
    model = build_tiny_whisper(tmp_path / "tiny_whisper_en", texts,
                               **{**MICRO_WHISPER, "multilingual": False})
    out = tmp_path / "results"
    proc = run_recipe(REPO / "recipes" / "LibriSpeech" / "Whisper", [
        f"hparams/{yaml}", f"--data_folder={root}", f"--output_folder={out}",
        f"--model={model}", "--number_of_epochs=1", "--precision=fp32",
        "--eval_precision=fp32", "--device=cpu", "--batch_size=8", "--num_workers=0",
        "--valid_every_steps=1", "--grad_accumulation_factor=1", "--max_duration=3.0",
    ])
    assert "test-clean: WER" in proc.stdout and "test-other: WER" in proc.stdout
    for name in ("train_log.txt", "wer_test-clean.txt", "wer_test-other.txt", "curves.png"):
        assert (out / name).exists(), name
    assert (out / "train_log.txt").read_text().count("valid WER") >= 2
    lora = json.loads((out / "run.json").read_text())["lora"]
    assert (lora or {}).get("where") == ("decoder" if "lora" in yaml else None)


def test_whisper_medium_yaml_is_the_small_one_with_another_model():
    """Two model sizes, one recipe: the files may differ only in the model's name."""
    hp = REPO / "recipes" / "LibriSpeech" / "Whisper" / "hparams"
    small = (hp / "whisper_small_en.yaml").read_text(encoding="utf-8")
    medium = (hp / "whisper_medium_en.yaml").read_text(encoding="utf-8")
    assert medium == small.replace("small", "medium")
