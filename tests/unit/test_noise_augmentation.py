"""Noise and reverberation augmentation: the bundled noise/RIR set (local/make_noise_rir.py), the
yaml keys that put SpeechBrain's AddNoise/AddReverb in the augmenter, their checks, the noisy test
split, and a tiny epoch of whisper_base_encoder_noisy.yaml with both on."""

import csv
import hashlib
import importlib.util
import math

import pytest
import soundfile as sf
import torch
from fakes import REPO, SYNTHETIC, write_subset
from hyperpyyaml import load_hyperpyyaml
from speechbrain.augment.time_domain import AddNoise, AddReverb

from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import build_experiment, load_yaml

NOISE = SYNTHETIC / "noise"
CTC = REPO / "recipes" / "Synthetic" / "CTC" / "hparams"
NOISY_YAML = CTC / "whisper_base_encoder_noisy.yaml"
spec = importlib.util.spec_from_file_location("make_noise_rir",
                                              REPO / "local" / "make_noise_rir.py")
make_noise_rir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_noise_rir)


def speech(n=3, seconds=2.0):
    """The first ``n`` bundled English test utterances, cut or zero-padded to ``seconds``."""
    with open(SYNTHETIC / "en" / "test.csv", newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f), strict=False)]
    size = int(seconds * 16000)
    batch = torch.zeros(n, size)
    for i, r in enumerate(rows):
        wav = torch.tensor(sf.read(r["wav"].replace("$data_root", str(SYNTHETIC)),
                                   dtype="float32")[0])[:size]
        batch[i, :len(wav)] = wav
    return batch


def augment_yaml(**keys):
    """hparams/augment.yaml loaded on its own with ``keys`` set."""
    with open(REPO / "hparams" / "augment.yaml", encoding="utf-8") as f:
        return load_hyperpyyaml(f, keys)


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_generator_is_deterministic_and_writes_csvs_addnoise_and_addreverb_read(tmp_path):
    kwargs = {"corpus": SYNTHETIC, "seed": 3, "clip_seconds": 1.0, "clips_per_kind": 1,
              "rirs_per_set": 2}
    first = make_noise_rir.make_set(tmp_path / "a", **kwargs)
    make_noise_rir.make_set(tmp_path / "b", **kwargs)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    make_noise_rir.make_set(tmp_path / "c", **{**kwargs, "seed": 4})
    assert digests(tmp_path / "a") != digests(tmp_path / "c")  # the seed is what decides
    assert set(first) == {"noise_train", "noise_heldout", "rir_train", "rir_heldout"}

    clean = speech(2, 1.5)
    for name in ("noise_train", "noise_heldout"):
        with open(first[name], newline="", encoding="utf-8") as f:
            kinds = [r["ID"].split("_")[1] for r in csv.DictReader(f)]
        assert kinds == list(make_noise_rir.KINDS)
        noisy = AddNoise(str(first[name]), snr_low=0, snr_high=0, pad_noise=True,
                         replacements={"noise_folder": str(first[name].parent)})(
            clean, torch.ones(2))
        assert noisy.shape == clean.shape and not torch.allclose(noisy, clean)
    for name in ("rir_train", "rir_heldout"):
        reverb = AddReverb(str(first[name]), replacements={"rir_folder": str(first[name].parent)})
        assert reverb(clean).shape == clean.shape
        response = sf.read(first[name].parent / "wav" / f"{name.split('_')[1]}_rir_0.wav")[0]
        assert abs(response).argmax() == 0  # the direct path leads (AddReverb aligns on it)


def test_off_by_default_the_pool_is_the_three_steps_it_was():
    hp = augment_yaml()
    assert list(hp["augmenter"].augmentations) == ["SpeedPerturb0", "DropFreq1", "DropChunk2"]
    assert hp["add_noise_step"].csv_file is None and hp["add_reverb_step"].csv_file is None
    for recipe in (CTC / "whisper_base_encoder.yaml", CTC / "wavlm_tiny.yaml"):
        hp = load_yaml(recipe, {"output_folder": "unused"})
        assert not hp["add_noise"] and not hp["add_reverb"]
        assert len(hp["augmentation"]["augmenter"].augmentations) == 3


def measured_snr(clean, noisy):
    """The SNR of ``noisy`` against ``clean``, per utterance: the clean part is the projection on
    the clean signal, the rest is the added noise."""
    scale = (noisy * clean).sum(1) / (clean * clean).sum(1)
    noise = noisy - scale[:, None] * clean
    return 10 * torch.log10((scale[:, None] * clean).pow(2).sum(1) / noise.pow(2).sum(1))


@pytest.mark.parametrize("snr", [5.0, 15.0])
def test_switched_on_the_augmenter_adds_noise_at_the_requested_snr(snr):
    hp = augment_yaml(add_noise=True, noise_manifest=str(NOISE / "noise_train.csv"),
                      snr_low=snr, snr_high=snr, add_reverb=True,
                      rir_manifest=str(NOISE / "rir_train.csv"))
    steps = hp["augmenter"].augmentations
    assert steps["AddNoise3"] is hp["add_noise_step"]
    assert steps["AddReverb4"] is hp["add_reverb_step"]
    clean = speech(4, 2.0)
    torch.manual_seed(0)
    noisy = steps["AddNoise3"](clean, torch.ones(4))
    assert not torch.allclose(noisy, clean)
    measured = measured_snr(clean, noisy)
    assert measured.tolist() == pytest.approx([snr] * 4, abs=1.0), measured
    # the whole augmenter, every step on every batch: the clean batch (concat_original), then
    # its augmented copy
    hp["augmenter"].min_augmentations = hp["augmenter"].max_augmentations = 5
    out, _ = hp["augmenter"](clean, torch.ones(4))
    assert out.shape[0] == 8 and torch.equal(out[:4, :clean.shape[1]], clean)
    assert not torch.allclose(out[4:, :clean.shape[1]], clean, atol=1e-3)


def test_reverberation_keeps_the_length_and_the_alignment():
    hp = augment_yaml(add_reverb=True, rir_manifest=str(NOISE / "rir_train.csv"))
    clean = speech(3, 2.5)
    clicks = torch.zeros(2, 16000)
    clicks[0, 1000], clicks[1, 7000] = 1.0, 1.0
    for _ in range(4):  # four RIRs (one per batch)
        wet = hp["add_reverb_step"](clean)
        assert wet.shape == clean.shape
        assert not torch.allclose(wet, clean)
        # a click stays where it was (the RIR's direct path leads) and gets a reverberant tail
        wet = hp["add_reverb_step"](clicks)
        assert wet.shape == clicks.shape
        assert wet.abs().argmax(dim=1).tolist() == [1000, 7000]
        assert (wet[:, 7100:8000].abs().sum(1) > 0).all()


def test_a_missing_or_malformed_manifest_is_refused_with_the_key_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)add_noise is True but noise_manifest=None"
                                                r".*local/make_noise_rir.py"):
        augment_yaml(add_noise=True)
    with pytest.raises(FileNotFoundError, match=r"add_reverb is True but rir_manifest=.*nope.csv"
                                                r" is not a file.*--rir_manifest="):
        load_yaml(NOISY_YAML, {"output_folder": str(tmp_path), "rir_manifest": "nope.csv",
                               "noise_manifest": str(NOISE / "noise_train.csv")})
    bad = tmp_path / "bad.csv"
    bad.write_text("path,seconds\nx.wav,1.0\n")
    with pytest.raises(ValueError, match="noise_manifest=.*bad.csv is not a SpeechBrain"):
        augment_yaml(add_noise=True, noise_manifest=str(bad))
    gone = tmp_path / "gone.csv"
    gone.write_text("ID,duration,wav,wav_format,wav_opts\nn1,1.0,$noise_folder/n1.wav,wav,\n")
    with pytest.raises(FileNotFoundError, match=r"1 of its 1 files do not exist.*n1.wav"):
        augment_yaml(add_noise=True, noise_manifest=str(gone))


def test_keys_that_would_do_nothing_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(CTC.parent)  # the recipe's relative manifest paths start there
    out = {"output_folder": str(tmp_path)}
    # whisper_base_encoder.yaml includes augment.yaml with its own keys, without the noise ones
    with pytest.raises(ValueError, match=r"add_noise=True not passed into this recipe's "
                                         r"`augmentation` block.*`add_noise: !ref <add_noise>`"):
        load_yaml(CTC / "whisper_base_encoder.yaml", {**out, "add_noise": True})
    with pytest.raises(ValueError, match=r"add_reverb True, but the augmenter in use is null"):
        load_yaml(NOISY_YAML, {**out, "augmenter": None, "add_noise": False})


def test_the_noisy_test_split_is_en_test_mixed_at_5_db():
    manifests = prepare_synthetic({"data_folder": str(SYNTHETIC), "language": "en",
                                   "extra_tests": ["en_noisy"]})
    with open(manifests.tests["en_noisy"], newline="", encoding="utf-8") as f:
        noisy = list(csv.DictReader(f))
    with open(SYNTHETIC / "en" / "test.csv", newline="", encoding="utf-8") as f:
        clean = list(csv.DictReader(f))
    assert [r["ID"] for r in noisy] == [f"noisy_{r['ID']}" for r in clean]
    assert [r["wrd"] for r in noisy] == [r["wrd"] for r in clean]
    assert {r["noise"] for r in noisy} == set(make_noise_rir.KINDS)
    for r, c in zip(noisy[:5], clean[:5], strict=True):
        wav = sf.read(r["wav"].replace("$data_root", str(SYNTHETIC)))[0]
        dry = sf.read(c["wav"].replace("$data_root", str(SYNTHETIC)))[0]
        assert len(wav) == len(dry) and not math.isclose(abs(wav - dry).max(), 0.0)


def test_a_tiny_epoch_of_the_noisy_recipe_trains_on_noisy_batches(tmp_path, micro_whisper_en_dir):
    data = tmp_path / "data"
    write_subset(SYNTHETIC / "en", data / "en", {"train": 24, "valid": 4, "test": 4})
    write_subset(SYNTHETIC / "en_noisy", data / "en_noisy", {"test": 4})
    hp = load_yaml(NOISY_YAML, {
        "data_folder": str(data), "output_folder": str(tmp_path / "run"),
        "model": str(micro_whisper_en_dir), "number_of_epochs": 1, "batch_size": 12,
        "eval_batch_size": 4, "min_duration": 0.0,
        "noise_manifest": str(NOISE / "noise_train.csv"),
        "rir_manifest": str(NOISE / "rir_train.csv")})
    augmenter = hp["augmenter"]
    augmenter.augment_prob = 1.0  # every step on every batch
    augmenter.min_augmentations = augmenter.max_augmentations = 5
    calls = []
    for step in (hp["augmentation"]["add_noise_step"], hp["augmentation"]["add_reverb_step"]):
        step.register_forward_hook(lambda m, args, out: calls.append((type(m).__name__,
                                                                      args[0].shape)))
    exp = build_experiment(hp, {"device": "cpu"}, prepare_synthetic)
    exp.fit()
    names = [name for name, _ in calls]
    assert names.count("AddNoise") == names.count("AddReverb") == 2  # 24 utterances, 2 batches
    results = exp.evaluate()
    assert set(results) == {"test", "en_noisy"}
    assert (tmp_path / "run" / "wer_en_noisy.txt").is_file()
    assert "white" in (tmp_path / "run" / "wer_en_noisy_groups.md").read_text()
