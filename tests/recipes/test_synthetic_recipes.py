"""The bundled Synthetic recipe runs end to end (subprocess, offline), keeps the best-WER model."""

import json
import re

import pytest
import yaml
from fakes import MICRO_ENCODER, MICRO_WHISPER, REPO, SYNTHETIC, run_recipe, write_subset

RECIPE = REPO / "recipes" / "Synthetic" / "CTC"


def kept_checkpoints(save):
    return {p.parent.name: yaml.safe_load(p.read_text()) for p in save.glob("CKPT+*/CKPT.yaml")}


def check_two_epoch_run(proc, out, files):
    """The run printed its test WER, wrote ``files``, validated twice, kept the best-WER
    checkpoint (plus at most the latest) and tested that one; returns the test alignments."""
    assert re.search(r"test: WER \d+\.\d+%  CER \d+\.\d+%", proc.stdout), proc.stdout[-2000:]
    for name in ("train_log.txt", "hyperparams.yaml", "wer_test.txt", "curves.png",
                 "preflight_report.tsv", *files):
        assert (out / name).exists(), name
    log = (out / "train_log.txt").read_text()
    valid = {int(e): float(w) for e, w in
             re.findall(r"epoch: (\d+), step: \d+.*valid WER: ([\d.e+-]+)", log)}
    assert sorted(valid) == [1, 2]
    kept = kept_checkpoints(out / "save")
    assert 1 <= len(kept) <= 2
    best = min(valid.values())
    assert any(m["WER"] == pytest.approx(best) for m in kept.values())
    loaded = int(re.search(r"Epoch loaded: (\d+)", log).group(1))
    assert valid[loaded] == pytest.approx(best)  # testing used the best-WER checkpoint
    alignments = (out / "wer_test.txt").read_text()
    assert "%WER" in alignments and alignments.count("=" * 20) >= 8
    return alignments


@pytest.mark.recipe
@pytest.mark.parametrize("language,augment", [("en", True), ("da", False)])
def test_synthetic_recipe_trains_two_epochs_and_tests_the_best(tmp_path, language, augment):
    data = tmp_path / "data"
    write_subset(SYNTHETIC / language, data / language, {"train": 40, "valid": 8, "test": 8})
    out = tmp_path / "results"
    proc = run_recipe(RECIPE, [
        "hparams/wavlm_tiny.yaml", f"--language={language}", f"--data_folder={data}",
        f"--output_folder={out}", f"--tiny_config={json.dumps(MICRO_ENCODER)}",
        "--number_of_epochs=2", "--max_batch_seconds=12", "--lr_encoder=0.003",
        "--lr_head=0.003", "--warmup_steps=5", "--device=cpu",
        # the override the yaml documents for turning waveform augmentation on
        *(["--augmenter=!ref <augmentation[augmenter]>"] if augment else []),
    ])
    check_two_epoch_run(proc, out, ["save/label_encoder.txt", "tiny_model/config.json"])
    if language == "da":
        assert re.search("[æøå]", (out / "save" / "label_encoder.txt").read_text())


@pytest.mark.recipe
def test_hub_id_with_a_tiny_config_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="tiny_config is set but model=microsoft/wavlm-large"):
        run_recipe(RECIPE, ["hparams/wavlm_tiny.yaml", f"--output_folder={tmp_path}",
                            "--model=microsoft/wavlm-large", '--tiny_config={hidden_size: 8}'])


@pytest.mark.recipe
def test_rerunning_the_command_resumes_from_the_latest_checkpoint(tmp_path):
    data = tmp_path / "data"
    write_subset(SYNTHETIC / "en", data / "en", {"train": 16, "valid": 4, "test": 4})
    out = tmp_path / "results"
    args = ["hparams/wavlm_tiny.yaml", f"--data_folder={data}", f"--output_folder={out}",
            f"--tiny_config={json.dumps(MICRO_ENCODER)}", "--max_batch_seconds=12",
            "--device=cpu", "--tensorboard=True", "--log_every_steps=1"]
    run_recipe(RECIPE, [*args, "--number_of_epochs=1"])
    proc = run_recipe(RECIPE, [*args, "--number_of_epochs=2"])
    log = (out / "train_log.txt").read_text()
    epochs = [int(e) for e in re.findall(r"^epoch: (\d+), step: (\d+)", log, re.M)
              for e in e[:1]]
    assert epochs == [1, 2], log  # epoch 1 was not trained again
    steps = [int(s) for s in re.findall(r"^epoch: \d+, step: (\d+)", log, re.M)]
    assert steps[1] > steps[0]  # the optimizer-step count carried over
    assert "Loading a checkpoint" in proc.stdout + proc.stderr

    # TensorBoard: one curve across both processes, against the optimizer step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard")).Reload()
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    train = [e.step for e in board.Scalars("train/loss")]
    assert train == list(range(1, steps[1] + 1))  # every step once, none drawn twice
    assert [e.step for e in board.Scalars("valid/WER")] == steps
    wers = [float(w) for w in re.findall(r"valid WER: ([\d.e+-]+)", log)]
    assert [e.value for e in board.Scalars("valid/WER")] == pytest.approx(wers)
    assert {"lr/encoder", "lr/head", "train/seconds_per_step", "valid/CER"} <= \
        set(board.Tags()["scalars"])


WHISPER_RECIPE = REPO / "recipes" / "Synthetic" / "Whisper"


@pytest.mark.recipe
@pytest.mark.parametrize("language", ["en", "da"])
def test_synthetic_whisper_recipe_trains_two_epochs_and_tests_the_best(tmp_path, language):
    data = tmp_path / "data"
    write_subset(SYNTHETIC / language, data / language, {"train": 40, "valid": 8, "test": 8})
    out = tmp_path / "results"
    proc = run_recipe(WHISPER_RECIPE, [
        "hparams/whisper_tiny.yaml", f"--language={language}", f"--data_folder={data}",
        f"--output_folder={out}", f"--tiny_config={json.dumps(MICRO_WHISPER)}",
        "--number_of_epochs=2", "--max_batch_seconds=12", "--warmup_steps=5", "--device=cpu",
        "--augmenter=!ref <augmentation[augmenter]>",
    ])
    alignments = check_two_epoch_run(proc, out, ["tiny_model/tokenizer.json"])
    if language == "da":  # the references kept their letters through normalisation
        assert re.search("[æøå]", alignments)


@pytest.mark.recipe
def test_the_danish_retain_recipe_watches_english_replays_it_and_selects_by_it(
        tmp_path, micro_whisper_multi_dir):
    """whisper_base_da_retain.yaml on a micro multilingual Whisper: the English retain set is
    scored before training and at both validations, English replay utterances train beside the
    Danish ones, and the end of the run names the checkpoint the retain set chose."""
    data = tmp_path / "data"
    write_subset(SYNTHETIC / "da", data / "da", {"train": 20, "valid": 6, "test": 6})
    write_subset(SYNTHETIC / "en", data / "en", {"train": 20, "valid": 6})
    write_subset(SYNTHETIC / "en_heldout", data / "en_heldout", {"test": 6})
    out = tmp_path / "results"
    proc = run_recipe(WHISPER_RECIPE, [
        "hparams/whisper_base_da_retain.yaml", f"--data_folder={data}",
        f"--output_folder={out}", f"--model={micro_whisper_multi_dir}", "--number_of_epochs=2",
        "--zero_shot=False", "--device=cpu", "--retain_max_rise=1000", "--window_seconds=4",
    ])
    log = (out / "train_log.txt").read_text()
    assert log.count("valid WER_retain_en:") == 2
    base = json.loads((out / "retain_base.json").read_text())["retain_en"]
    assert f"retain_en: WER {base:.2f}% as loaded -> " in proc.stdout
    assert "tested the best-WER checkpoint whose retain WER rose by at most 1000 points" in \
        proc.stdout
    assert re.search(r"en_heldout: WER \d+\.\d+%", proc.stdout)
    assert "replay: 5 utterances of the retain sets' replay manifests join the 20" in \
        proc.stdout + proc.stderr
