"""Every hparams file loads, opens with its header, and is exercised by a recipe test."""

import json
import re

import pytest
from fakes import MICRO_ENCODER, MICRO_WHISPER, REPO

from speechtune.recipe import compose, family_of, load_yaml

# the collection's own recipes; one a user made with tools/new_recipe.py (its header says so) is
# theirs, and tests/tools/test_new_recipe.py covers what the tool writes
HPARAMS = sorted(p for p in REPO.glob("recipes/*/*/hparams/*.yaml")
                 if "copied by tools/new_recipe.py" not in p.read_text(encoding="utf-8"))
# hparams file -> the test (under tests/) that runs it end to end
RECIPE_TESTS = {
    "recipes/Synthetic/CTC/hparams/wavlm_tiny.yaml": "recipes/test_synthetic_recipes.py",
    "recipes/Synthetic/CTC/hparams/whisper_base_encoder.yaml":
        "recipes/test_whisper_encoder_ctc.py",
    "recipes/Synthetic/CTC/hparams/whisper_base_encoder_noisy.yaml":
        "unit/test_noise_augmentation.py",
    "recipes/LibriSpeech/CTC/hparams/wavlm_large.yaml": "recipes/test_librispeech.py",
    "recipes/LibriSpeech/CTC/hparams/wavlm_large_paper.yaml": "recipes/test_librispeech.py",
    "recipes/Synthetic/Whisper/hparams/whisper_tiny.yaml": "recipes/test_synthetic_recipes.py",
    "recipes/Synthetic/Whisper/hparams/whisper_base.yaml": "recipes/test_export.py",
    "recipes/Synthetic/Whisper/hparams/whisper_base_da_retain.yaml":
        "recipes/test_synthetic_recipes.py",
    "recipes/LibriSpeech/Whisper/hparams/whisper_small_en.yaml": "recipes/test_librispeech.py",
    "recipes/LibriSpeech/Whisper/hparams/whisper_small_en_lora.yaml":
        "recipes/test_librispeech.py",
    # the small recipe with another model name (a test in test_librispeech.py checks that)
    "recipes/LibriSpeech/Whisper/hparams/whisper_medium_en.yaml": "recipes/test_librispeech.py",
    "recipes/CommonVoice/CTC/hparams/wav2vec2_large_960h_en.yaml": "recipes/test_corpus_recipes.py",
    "recipes/CommonVoice/CTC/hparams/xls_r_300m.yaml": "recipes/test_corpus_recipes.py",
    "recipes/CommonVoice/Whisper/hparams/whisper_small.yaml": "recipes/test_corpus_recipes.py",
    "recipes/CoRal/CTC/hparams/xls_r_300m_da.yaml": "recipes/test_corpus_recipes.py",
    "recipes/CoRal/Whisper/hparams/whisper_small_da.yaml": "recipes/test_corpus_recipes.py",
    "recipes/CoRal/Whisper/hparams/whisper_small_da_lora.yaml": "recipes/test_corpus_recipes.py",
    "recipes/Danish/Whisper/hparams/whisper_small_da_mix.yaml": "recipes/test_mixing_recipe.py",
    "recipes/Synthetic/Whisper/hparams/whisper_base_mix.yaml": "recipes/test_mixing_recipe.py",
}


def test_every_hparams_file_has_a_recipe_test():
    rel = {p.relative_to(REPO).as_posix() for p in HPARAMS}
    assert rel == set(RECIPE_TESTS), "add the new hparams file to RECIPE_TESTS and test it"
    for yaml, test in RECIPE_TESTS.items():
        name = yaml.rsplit("/", 1)[1]
        assert name in (REPO / "tests" / test).read_text(), f"{test} does not run {yaml}"


@pytest.mark.parametrize("path", HPARAMS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_header_names_the_run_command(path):
    head = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert "# Recipe:" in head and "# Run:" in head and "python train.py" in head
    assert "Override example" in head


@pytest.mark.parametrize("path", HPARAMS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_loads_and_builds_with_a_tiny_model(path, tmp_path, micro_encoder_dir,
                                            micro_whisper_en_dir, micro_whisper_multi_dir,
                                            monkeypatch):
    """Every yaml loads (building no model), and its family builds its model from the model key
    (a micro model standing in for the hub one)."""
    monkeypatch.chdir(path.parents[1])  # loaded where it runs: its relative paths start there
    text = path.read_text(encoding="utf-8")
    overrides = {"output_folder": str(tmp_path)}
    if re.search(r"^data_folder: ", text, re.M) is None:  # the base's !PLACEHOLDER
        overrides["data_folder"] = str(tmp_path)
    if re.search(r"^language: !PLACEHOLDER", text, re.M):  # the language is a parameter
        overrides["language"] = "da"
    composed = compose(path)  # with the keys a recipe takes from its defaults chain
    model = str(composed["model"])
    if model.startswith("tiny:"):
        overrides["tiny_config"] = MICRO_ENCODER if model == "tiny:wavlm" else MICRO_WHISPER
    elif "WhisperEncoder" in text or ("whisper" in model and not model.endswith(".en")):
        overrides["model"] = micro_whisper_multi_dir
    elif model.endswith(".en"):
        overrides["model"] = micro_whisper_en_dir
    else:
        overrides["model"] = micro_encoder_dir
    if composed.get("window_seconds") is not None:  # a shorter window than the model's
        overrides["window_seconds"] = 4
    hparams = load_yaml(path, json.loads(json.dumps(overrides)))
    assert not list(tmp_path.rglob("*.json"))  # loading built no model (only folders)
    family = family_of(hparams)(hparams)
    family.build_model(["en tekst", "another text"])
    if hparams["family"] == "ctc":  # 20 ms frames: WavLM's CNN has one fewer (25 ms field)
        frames = 50 if "WhisperEncoder" in text else 49
        assert family.encoder.output_frames(16000) == frames
        steps = hparams["freeze_encoder_steps"]
        assert steps == "always" or int(steps) >= 0
    else:
        assert family.whisper.window_seconds == 4  # the micro model's window
        assert isinstance(hparams["freeze_encoder"], bool)
    assert hparams["precision"] in ("fp32", "bf16", "fp16")


def test_unknown_override_is_an_error(tmp_path):
    path = REPO / "recipes/Synthetic/CTC/hparams/wavlm_tiny.yaml"
    with pytest.raises(KeyError, match="lr_enocder"):
        load_yaml(path, {"lr_enocder": 0.1, "output_folder": str(tmp_path)})


def test_an_option_given_twice_is_named(tmp_path):
    """SpeechBrain fails with a ruamel duplicate-key trace for a yaml key given twice and keeps
    the last of a run option given twice: both stop, naming the option."""
    from speechtune.recipe import load_hparams

    path = REPO / "recipes/Synthetic/CTC/hparams/wavlm_tiny.yaml"
    with pytest.raises(ValueError, match=r"more than once on the command line: "
                                         r"--number_of_epochs \(2 times\), --device \(2 times\)"):
        load_hparams([str(path), "--number_of_epochs=2", f"--output_folder={tmp_path}",
                      "--device=cpu", "--number_of_epochs", "3", "--device=cuda"])
    assert not list(tmp_path.iterdir())  # stopped before anything was written


def test_a_home_folder_after_the_equals_sign_is_expanded(tmp_path, monkeypatch):
    """The shell expands ``--data_folder ~/cv`` but not ``--data_folder=~/cv``; the runner does,
    so neither the manifests' ``$data_root`` nor the output folder holds a literal ``~``."""
    from speechtune.recipe import load_hparams

    monkeypatch.setenv("HOME", str(tmp_path))
    path = REPO / "recipes/Synthetic/CTC/hparams/wavlm_tiny.yaml"
    hparams, _ = load_hparams([str(path), "--output_folder=~/run", "--data_folder=~/corpus",
                               f"--tiny_config={json.dumps(MICRO_ENCODER)}"])
    assert hparams["output_folder"] == str(tmp_path / "run")
    assert hparams["data_folder"] == str(tmp_path / "corpus")
    assert (tmp_path / "run").is_dir()
