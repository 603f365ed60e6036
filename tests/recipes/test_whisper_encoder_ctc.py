"""CTC on Whisper's encoder (``speechtune.whisper_models``, ``whisper_base_encoder.yaml``) with a
micro Whisper (4 s window): frame arithmetic, encoder-only loading, staged freezing with two LR
groups, the pre-flight window check, a recipe run and its SpeechBrain-only export."""

import json
import logging
from pathlib import Path

import pytest
import torch
from fakes import REPO, SYNTHETIC, run_recipe, write_subset
from test_export import hypotheses, offline_python, split_files, tool, transcribe_split

CTC = REPO / "recipes" / "Synthetic" / "CTC"
YAML = CTC / "hparams" / "whisper_base_encoder.yaml"


def encoder(source, tmp_path, **kwargs):
    from speechtune.whisper_models import WhisperEncoder

    return WhisperEncoder(source, str(tmp_path / "hf_cache"), **kwargs).eval()


def test_output_frames_are_the_frames_the_encoder_returns(micro_whisper_en_dir, tmp_path,
                                                          caplog):
    enc = encoder(micro_whisper_en_dir, tmp_path)
    window = enc.model.config.max_source_positions
    assert (enc.window_seconds, window, enc.frame_samples) == (4, 200, 320)
    with torch.no_grad():
        full = enc.forward_encoder(enc._get_mel(torch.zeros(1, 100)))
        assert full.shape[1] == window  # the encoder always encodes its whole window
        for n in (1, 319, 320, 321, 16000, 16001, 40000, 64000):
            out = enc(torch.randn(1, n) * 0.1)
            assert out.shape == (1, enc.output_frames(n), enc.model.config.d_model), n
        assert [enc.output_frames(n) for n in (1, 320, 321, 16000, 64000)] == [1, 1, 2, 50, 200]
        with caplog.at_level(logging.WARNING, logger="speechtune.whisper_models"):
            assert enc(torch.randn(1, 70000)).shape[1] == window == enc.output_frames(70000)
        assert "only the first 4 s are encoded" in caplog.text

        # batched with a longer utterance, a short one keeps its features, and the CTC lengths
        # (relative to the padded batch) select its own frames, give or take the last one
        short, long_ = torch.randn(21000) * 0.1, torch.randn(53000) * 0.1
        batch = torch.zeros(2, 53000)
        batch[0, :21000], batch[1] = short, long_
        lens = torch.tensor([21000 / 53000, 1.0])
        feats = enc(batch, lens)
        alone = enc(short[None])
        assert torch.allclose(feats[0, :alone.shape[1]], alone[0], atol=1e-5)
        used = torch.round(lens * feats.shape[1]).int().tolist()
        assert abs(used[0] - enc.output_frames(21000)) <= 1
        assert used[1] == enc.output_frames(53000)

    cut = encoder(micro_whisper_en_dir, tmp_path, window_seconds=2)
    assert cut.output_frames(64000) == 100 == cut.model.config.max_source_positions
    assert cut(torch.randn(1, 16000)).shape[1] == 50


def test_only_the_encoder_is_loaded_with_its_pretrained_weights(micro_whisper_en_dir, tmp_path):
    from transformers import WhisperModel

    enc = encoder(micro_whisper_en_dir, tmp_path)
    reference = WhisperModel.from_pretrained(micro_whisper_en_dir).encoder.state_dict()
    state = enc.model.encoder.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert enc.model.decoder is None
    assert not any(n.startswith("decoder") for n, _ in enc.model.named_parameters())
    assert enc.model.config.hidden_size == enc.model.config.d_model  # what the CTC head reads
    with pytest.raises(ValueError, match="has none. Use vocabulary: new"):
        enc.pretrained_ctc()


def experiment(data_dir, out, whisper, **overrides):
    """An in-process ``Experiment`` of the Whisper-encoder CTC yaml on the micro Whisper."""
    from speechtune.prepare.synthetic import prepare_synthetic
    from speechtune.recipe import build_experiment, load_yaml

    out.mkdir(parents=True, exist_ok=True)
    base = {"data_folder": str(data_dir), "output_folder": str(out), "model": whisper,
            "number_of_epochs": 1, "batch_size": 4, "min_duration": 0.0, **overrides}
    return build_experiment(load_yaml(YAML, base), {"device": "cpu"}, prepare_synthetic)


def test_staged_freezing_then_both_lr_groups_train(synthetic_subset, tmp_path,
                                                   micro_whisper_en_dir):
    exp = experiment(synthetic_subset, tmp_path / "run", micro_whisper_en_dir,
                     freeze_encoder_steps=2, warmup_steps=2, lr_encoder=0.001, lr_head=0.01)
    brain = exp.brain
    assert brain.modules.head.w.in_features == 32  # the micro Whisper's d_model
    params = {n: p for n, p in brain.modules.encoder.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    head0 = brain.modules.head.w.weight.detach().clone()
    states, orig = [], brain.on_fit_batch_end

    def record(batch, outputs, loss, should_step):
        orig(batch, outputs, loss, should_step)
        states.append((brain.optimizer_step, brain.current_lrs(),
                       all(torch.equal(p, start[n]) for n, p in params.items()),
                       all(p.grad is None for p in params.values())))

    brain.on_fit_batch_end = record
    exp.fit()
    assert len(states) >= 5
    assert set(brain.optimizers_dict) == {"encoder", "head"}
    for step, _, unchanged, no_grad in states:
        if step <= 2:  # frozen: no update and no gradient ever computed
            assert unchanged and no_grad, f"encoder changed while frozen at step {step}"
    assert not states[-1][2], "the encoder never trained after freeze_encoder_steps"
    assert not torch.equal(brain.modules.head.w.weight, head0)
    lrs = states[2][1]  # each group on its own Noam schedule, peak at warmup's end
    assert lrs["lr_encoder"] == pytest.approx(0.001 * lrs["lr_head"] / 0.01)


def test_preflight_stops_audio_beyond_the_encoder_window(synthetic_subset, tmp_path,
                                                         micro_whisper_en_dir):
    from speechtune.preflight import PreflightError

    with pytest.raises(PreflightError, match=r"(?s)audio_too_long: \d+ utterance.*"
                                             r"beyond_window: \d+ utterance.*window_seconds=2"):
        experiment(synthetic_subset, tmp_path / "run", micro_whisper_en_dir, window_seconds=2)


@pytest.fixture(scope="module")
def whisper_ctc_run(tmp_path_factory, micro_whisper_en_dir):
    """The recipe's command on the micro Whisper, one tiny epoch, an almost untrained head: its
    greedy transcripts are long strings of characters, which any difference would change."""
    data = tmp_path_factory.mktemp("data")
    write_subset(SYNTHETIC / "en", data / "en", {"train": 16, "valid": 6, "test": 10})
    out = tmp_path_factory.mktemp("run")
    proc = run_recipe(CTC, [
        "hparams/whisper_base_encoder.yaml", f"--model={micro_whisper_en_dir}",
        f"--data_folder={data}", f"--output_folder={out}", "--number_of_epochs=1",
        "--batch_size=4", "--eval_batch_size=4", "--valid_every_steps=2",
        "--freeze_encoder_steps=2", "--warmup_steps=2", "--lr_encoder=1e-6", "--lr_head=1e-6",
        "--device=cpu"])
    return data, out, proc


@pytest.mark.recipe
def test_the_recipe_trains_validates_and_tests(whisper_ctc_run):
    _, out, proc = whisper_ctc_run
    assert "test: WER" in proc.stdout, proc.stdout[-2000:]
    log = (out / "train_log.txt").read_text()
    assert "epoch: 1, step: 2," in log and "epoch: 1, step: 4," in log and "split: test" in log
    info = json.loads((out / "run.json").read_text())
    assert info["family"] == "ctc"
    assert info["encoder"] == "speechtune.whisper_models.WhisperEncoder"
    config = json.loads((out / "save" / "model_files" / "config.json").read_text())
    assert config["max_source_positions"] == 200 and config["d_model"] == 32
    assert (out / "save" / "model_files" / "preprocessor_config.json").is_file()


@pytest.mark.recipe
def test_export_is_speechbrain_only_and_transcribes_as_the_run_did(whisper_ctc_run, tmp_path):
    data, run, _ = whisper_ctc_run
    export = tmp_path / "exported"
    printed = tool("checkpoints.py", "export", run, export)
    summary = json.loads((export / "speechtune_export.json").read_text())
    assert summary["model_class"] is None
    card = (export / "README.md").read_text()
    assert "transformers: not supported" in card and "no CTC model class for Whisper" in card
    assert not (export / "vocab.json").exists()  # no transformers CTC tokenizer either
    assert "speechtune.whisper_models.WhisperEncoder" in (export / "hyperparams.yaml").read_text()
    assert "exported for SpeechBrain's EncoderASR only (transformers has no CTC class" in printed

    ran = hypotheses(run / "wer_test.txt")
    assert sum(len(h) for h in ran.values()) >= 10  # not all empty: the comparison means something
    for batch_size in (4, 1):  # the run's batches, and one file at a time
        decoded = transcribe_split(export, data, batch_size)
        assert {i: t.split() for i, t in decoded.items()} == ran, batch_size

    # a fresh offline process, the folder moved: EncoderASR with the fine-tuned encoder weights
    (export).rename(tmp_path / "moved")
    _, wavs = split_files(data)
    printed = offline_python("""
import torch
from speechtune.export import load_asr
asr = load_asr(sys.argv[1])
state = torch.load(sys.argv[2], map_location="cpu")
mine = asr.mods.encoder.ssl.state_dict()
same = all(torch.equal(mine[k], v) for k, v in state.items() if k.startswith("model."))
print(type(asr).__name__, same, repr(asr.transcribe_file(sys.argv[3])))
""", tmp_path / "moved", Path(tool("checkpoints.py", "best", run).strip()) / "encoder.ckpt",
        wavs[0])
    assert printed.splitlines()[-1].startswith("EncoderASR True '")
