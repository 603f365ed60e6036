"""Tiny offline encoders: every SSL family builds, saves in HF format and loads offline."""

import json

import pytest
import torch
from fakes import MICRO_ENCODER

from speechtune.models import SSLEncoder
from speechtune.tiny import build_tiny_encoder, resolve_source


@pytest.mark.parametrize("model_type", ["wavlm", "wav2vec2", "hubert"])
def test_tiny_encoder_loads_offline_through_speechbrain(tmp_path, model_type):
    cfg = {k: v for k, v in MICRO_ENCODER.items() if k != "model_type"}
    path = build_tiny_encoder(tmp_path / model_type, model_type, **cfg)
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        assert (tmp_path / model_type / name).exists()
    config = json.loads((tmp_path / model_type / "config.json").read_text())
    assert config["model_type"] == model_type
    enc = SSLEncoder(path, str(tmp_path / "cache"), freeze_feature_extractor=True)
    wav = torch.randn(2, 16000)
    out = enc(wav, torch.tensor([1.0, 0.5]))
    assert out.shape == (2, enc.output_frames(16000), 32)
    assert not any(p.requires_grad for p in enc.model.feature_extractor.parameters())
    cnn_out = []  # a frozen CNN builds no autograd graph in training (no backward through it)
    enc.model.feature_extractor.register_forward_hook(lambda m, i, o: cnn_out.append(o))
    enc.train()
    assert enc(wav).requires_grad and not cnn_out[-1].requires_grad


def test_config_overrides_apply_and_unknown_keys_fail(micro_encoder_dir, tmp_path):
    enc = SSLEncoder(micro_encoder_dir, str(tmp_path), config_overrides={"layerdrop": 0.3,
                                                                          "mask_feature_prob": 0.1})
    assert enc.model.config.layerdrop == 0.3
    enc.train()
    enc(torch.randn(2, 16000))  # channel masking runs (WavLMConfig lacks mask_feature_min_masks)
    with pytest.raises(ValueError, match="has no 'layer_drop'"):
        SSLEncoder(micro_encoder_dir, str(tmp_path), config_overrides={"layer_drop": 0.1})


def test_masking_switched_on_for_a_checkpoint_saved_without_it_gets_an_initialised_embedding(
        micro_encoder_dir, tmp_path):
    """A checkpoint saved with masking off has no ``masked_spec_embed`` (the vector masked frames
    get). Switched on by ``config_overrides``, transformers creates it; before 5.22 it left it
    uninitialised (``torch.empty``: anything up to 1e38 on 5.17-5.21, non-finite CTC losses),
    which is why setup.cfg asks for transformers 5.23 or newer. transformers' init is U(0, 1)."""
    assert MICRO_ENCODER["mask_time_prob"] == 0.0  # the saved micro encoder has no embedding
    enc = SSLEncoder(micro_encoder_dir, str(tmp_path), config_overrides={"mask_time_prob": 0.5})
    embed = enc.model.masked_spec_embed
    assert embed.shape == (32,)
    assert 0.0 <= embed.min() and embed.max() < 1.0 and embed.std() > 0.1
    enc.train()
    assert enc(torch.randn(2, 16000)).isfinite().all()


def test_tiny_presets_build_once_and_other_sources_pass_through(tmp_path):
    assert resolve_source("microsoft/wavlm-large", tmp_path, "encoder") == "microsoft/wavlm-large"
    with pytest.raises(ValueError, match="tiny_config is set but model=microsoft/wavlm-large"):
        resolve_source("microsoft/wavlm-large", tmp_path, "encoder", config=MICRO_ENCODER)
    with pytest.raises(ValueError, match="no such tiny preset; use one of tiny:wavlm"):
        resolve_source("tiny:hubert", tmp_path, "encoder")
    with pytest.raises(ValueError,
                       match="is an encoder-decoder model, but this recipe loads encoder models"):
        resolve_source("tiny:whisper", tmp_path, "encoder")
    built = resolve_source("tiny:wavlm", tmp_path / "t", "encoder", config=MICRO_ENCODER)
    assert built == str(tmp_path / "t")
    stamp = (tmp_path / "t" / "model.safetensors").stat().st_mtime_ns
    assert resolve_source("tiny:wavlm", built, "encoder", config=MICRO_ENCODER) == built
    assert (tmp_path / "t" / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    bigger = dict(MICRO_ENCODER, hidden_size=48)
    resolve_source("tiny:wavlm", built, "encoder", config=bigger)  # a changed config rebuilds
    assert json.loads((tmp_path / "t" / "config.json").read_text())["hidden_size"] == 48


def test_every_process_enters_the_collective_whatever_it_finds_on_disk(tmp_path, monkeypatch):
    """Under DDP a slower process can find the model the main process has just built. It must
    still enter ``run_on_main`` (a barrier): one that skipped it waited in the next collective
    while the main process waited in this one, and the run hung (seen in CI)."""
    import speechtune.tiny as tiny

    entered = []

    def run_on_main(func, *args, **kwargs):
        entered.append(func)
        func()

    monkeypatch.setattr(tiny, "run_on_main", run_on_main)
    built = resolve_source("tiny:wavlm", tmp_path / "t", "encoder", config=MICRO_ENCODER)
    resolve_source("tiny:wavlm", built, "encoder", config=MICRO_ENCODER)  # built: same calls
    assert len(entered) == 2
    resolve_source("microsoft/wavlm-large", tmp_path, "encoder")
    assert len(entered) == 2  # no tiny model: no collective on any process


def test_encoder_features_do_not_depend_on_the_batch(micro_encoder_dir, tmp_path):
    """Each utterance is normalised over its own samples (as transformers' feature extractor
    does at inference), so padding it into a batch with a longer one changes nothing."""
    from transformers import Wav2Vec2FeatureExtractor

    enc = SSLEncoder(micro_encoder_dir, str(tmp_path)).eval()
    short, long = 0.3 * torch.randn(8000) + 0.2, torch.randn(16000)
    batch = torch.zeros(2, 16000)
    batch[0, :8000], batch[1] = short, long
    with torch.no_grad():
        alone = enc(short[None], torch.tensor([1.0]))
        padded = enc(batch, torch.tensor([0.5, 1.0]))
    frames = alone.shape[1]
    torch.testing.assert_close(padded[0, :frames], alone[0], atol=1e-4, rtol=1e-4)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    hf = extractor([short.numpy(), long.numpy()], sampling_rate=16000, padding=True,
                   return_tensors="pt").input_values
    from speechtune.models import normalize_per_utterance

    torch.testing.assert_close(normalize_per_utterance(batch, torch.tensor([0.5, 1.0])), hf,
                               atol=1e-5, rtol=1e-5)


def test_whisper_log_mel_is_per_utterance_like_transformers(micro_whisper_en_dir, tmp_path):
    """The log-mel floor sits 8 decades below each utterance's own maximum, not the batch's."""
    from transformers import WhisperFeatureExtractor

    from speechtune.whisper_models import Whisper

    model = Whisper(micro_whisper_en_dir, str(tmp_path))
    quiet, loud = 0.01 * torch.randn(16000), torch.randn(48000)
    batch = torch.zeros(2, 48000)
    batch[0, :16000], batch[1] = quiet, loud
    mel = model._get_mel(batch)
    torch.testing.assert_close(mel[0], model._get_mel(quiet[None])[0])
    hf = WhisperFeatureExtractor.from_pretrained(micro_whisper_en_dir)(
        [quiet.numpy(), loud.numpy()], sampling_rate=16000, return_tensors="pt").input_features
    torch.testing.assert_close(mel, hf, atol=1e-4, rtol=1e-4)
