"""Every hparams file loads, opens with its header, and is exercised by a recipe test."""

import json
import re

import pytest
from conftest import MICRO_ENCODER, REPO
from hyperpyyaml import load_hyperpyyaml

HPARAMS = sorted(REPO.glob("recipes/*/*/hparams/*.yaml"))
# hparams file -> the test that runs it end to end
RECIPE_TESTS = {
    "recipes/Synthetic/CTC/hparams/wavlm_tiny.yaml": "tests/test_recipes.py",
    "recipes/LibriSpeech/CTC/hparams/wavlm_large.yaml": "tests/test_librispeech.py",
    "recipes/LibriSpeech/CTC/hparams/wavlm_large_paper.yaml": "tests/test_librispeech.py",
}


def test_every_hparams_file_has_a_recipe_test():
    rel = {p.relative_to(REPO).as_posix() for p in HPARAMS}
    assert rel == set(RECIPE_TESTS), "add the new hparams file to RECIPE_TESTS and test it"
    for yaml, test in RECIPE_TESTS.items():
        name = yaml.rsplit("/", 1)[1]
        assert name in (REPO / test).read_text(), f"{test} does not run {yaml}"


@pytest.mark.parametrize("path", HPARAMS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_header_names_the_run_command(path):
    head = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert "# Recipe:" in head and "# Run:" in head and "python train.py" in head
    assert "Override example" in head


@pytest.mark.parametrize("path", HPARAMS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_loads_with_a_tiny_encoder(path, tmp_path):
    overrides = {"output_folder": str(tmp_path), "encoder_hub": str(tmp_path / "tiny_encoder"),
                 "build_tiny_encoder": True, "tiny_encoder": MICRO_ENCODER}
    text = path.read_text(encoding="utf-8")
    if re.search(r"^data_folder: !PLACEHOLDER", text, re.M):
        overrides["data_folder"] = str(tmp_path)
    with open(path, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, json.loads(json.dumps(overrides)))
    assert hparams["encoder"].output_frames(16000) == 49  # WavLM arithmetic: 20 ms frames
    assert hparams["freeze_encoder_steps"] == "always" or int(hparams["freeze_encoder_steps"]) >= 0
    assert hparams["precision"] in ("fp32", "bf16", "fp16")


def test_unknown_override_is_an_error(tmp_path):
    path = REPO / "recipes/Synthetic/CTC/hparams/wavlm_tiny.yaml"
    with open(path, encoding="utf-8") as f, pytest.raises(KeyError, match="lr_enocder"):
        load_hyperpyyaml(f, {"lr_enocder": 0.1, "output_folder": str(tmp_path)})
