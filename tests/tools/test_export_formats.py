"""tools/checkpoints.py export --format ct2 | onnx: a whisper-base run (8 s window) to
CTranslate2 decodes as its transformers export does and converts back to the same logits; a CTC
run to ONNX gives the log-probabilities SpeechBrain's loaded model gives, on a padded batch."""

import csv
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from fakes import REPO, SYNTHETIC, experiment, run_recipe, write_subset

from speechtune import ct2_export, onnx_export
from speechtune.ct2 import convert_ct2_whisper
from speechtune.data import load_audio
from speechtune.export import export, load_asr

pytest.importorskip("ctranslate2")
pytest.importorskip("onnxruntime")


def split_signals(folder, split="test"):
    """The audio of a manifest's utterances (absolute paths, as ``write_subset`` writes them)."""
    with open(folder / f"{split}.csv", newline="", encoding="utf-8") as f:
        return [load_audio(r["wav"], 16000).numpy() for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def whisper_exports(tmp_path_factory, whisper_base_dir):
    """packaged:whisper-base fine-tuned one step on 8 English utterances with the recipe's 8 s
    window (tested on 1), exported as transformers files and as a float32 CTranslate2 folder;
    the tests decode 6 other utterances."""
    data = tmp_path_factory.mktemp("data")
    write_subset(SYNTHETIC / "en", data / "en", {"train": 8, "valid": 2, "test": 1})
    write_subset(SYNTHETIC / "en", data / "decode", {"test": 6})  # what the tests decode
    run = tmp_path_factory.mktemp("run")
    run_recipe(REPO / "recipes" / "Synthetic" / "Whisper", [
        "hparams/whisper_base.yaml", f"--data_folder={data}", f"--output_folder={run}",
        "--number_of_epochs=1", "--batch_size=8", "--lr=0.00002", "--warmup_steps=1",
        "--eval_batch_size=8", "--device=cpu", "--zero_shot=False", "--extra_tests=[]"])
    out = tmp_path_factory.mktemp("exports")
    export(run, out / "hf")
    export(run, out / "ct2", fmt="ct2", quantization="float32")
    return data, run, out / "hf", out / "ct2"


def test_ct2_greedy_decoding_writes_the_transformers_export_tokens(whisper_exports):
    """Same weights, the same 8 s window (features padded to 800 frames), the same prompt and
    suppressed tokens: CTranslate2's greedy token ids are transformers' greedy generate's."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    data, _, hf, ct2 = whisper_exports
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json",
            "preprocessor_config.json", "README.md"} <= {p.name for p in ct2.iterdir()}
    window = json.loads((ct2 / "preprocessor_config.json").read_text())
    assert window["chunk_length"] == 8 and window["nb_max_frames"] == 800
    marker = json.loads((ct2 / "speechtune_export.json").read_text())
    assert marker["format"] == "ct2" and marker["window_seconds"] == 8
    card = (ct2 / "README.md").read_text()  # faster-whisper 1.2 pads every window to 30 s
    assert "faster-whisper (1.2) cannot run this model" in card and "greedy_transcripts" in card
    signals = split_signals(data / "decode")
    ids, texts = ct2_export.greedy_transcripts(ct2_export.load_ct2(ct2, threads=1), signals,
                                               "en")
    model = WhisperForConditionalGeneration.from_pretrained(hf).eval()
    processor = WhisperProcessor.from_pretrained(hf)
    features = processor(signals, sampling_rate=16000, return_tensors="pt").input_features
    assert features.shape[-1] == 800
    with torch.no_grad():
        generated = model.generate(features, num_beams=1)
    # the text tokens: no prompt, end-of-text or padding (Whisper's special ids come last)
    hf_ids = [[t for t in row.tolist() if t < model.config.eos_token_id] for row in generated]
    assert sum(len(i) for i in ids) >= 30  # words, not empty strings
    assert ids == hf_ids
    assert texts == [t.strip() for t in processor.batch_decode(generated,
                                                               skip_special_tokens=True)]
    with pytest.raises(SystemExit, match="--format ct2 export, which SpeechBrain"):
        load_asr(ct2)


def teacher_forced_logits(folder, signal):
    """Logits of a transformers Whisper folder on its prefix and a few text tokens."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    features = processor(signal, sampling_rate=16000, return_tensors="pt").input_features
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 440, 3936, 307]])
    with torch.no_grad():
        return features.shape[-1], model(input_features=features, decoder_input_ids=tokens).logits


def test_ct2_round_trip_gives_the_same_logits(whisper_exports, tmp_path):
    """transformers -> CTranslate2 (its converter) -> transformers (speechtune.ct2): float32
    gives the logits back to float rounding, window included; float16 within its precision."""
    data, _, hf, ct2 = whisper_exports
    signal = split_signals(data / "decode")[0]
    frames, before = teacher_forced_logits(hf, signal)
    convert_ct2_whisper(ct2, tmp_path / "back32")
    back_frames, after = teacher_forced_logits(tmp_path / "back32", signal)
    assert frames == back_frames == 800
    assert (after - before).abs().max() < 1e-5  # 0 here: float32 is stored as it is
    ct2_export.export_ct2(hf, tmp_path / "ct2_16", "float16")
    convert_ct2_whisper(tmp_path / "ct2_16", tmp_path / "back16")
    after16 = teacher_forced_logits(tmp_path / "back16", signal)[1]
    # float16 weights: 0.015 here, on logits up to 34; the same best token at every position
    assert 0 < (after16 - before).abs().max() < 0.1
    assert torch.equal(after16.argmax(-1), before.argmax(-1))
    # a feature extractor that pads to another length than the positions is refused
    shutil.copytree(hf, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "processor_config.json").read_text())
    config["feature_extractor"].update(chunk_length=30, n_samples=480000, nb_max_frames=3000)
    (tmp_path / "bad" / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="pads to 3000 mel frames .* 400 positions"):
        ct2_export.export_ct2(tmp_path / "bad", tmp_path / "never", "float16")


@pytest.fixture(scope="module")
def ctc_run(tmp_path_factory):
    """A micro WavLM CTC run (in process, a few steps)."""
    data = tmp_path_factory.mktemp("data")
    write_subset(SYNTHETIC / "en", data / "en", {"train": 24, "valid": 3, "test": 4})
    out = tmp_path_factory.mktemp("run")
    experiment(data, out).fit()
    return data, out


def test_onnx_gives_speechbrains_log_probs_on_a_padded_batch(ctc_run, tmp_path):
    data, run = ctc_run
    export(run, tmp_path / "sb")
    export(run, tmp_path / "onnx", fmt="onnx")
    described = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert described["sample_rate"] == 16000 and described["blank_id"] == 0
    assert "dynamo=False" in described["exporter"]
    audio, lengths = onnx_export.padded_batch(split_signals(data / "en"))
    assert len(set(lengths.tolist())) == 4  # padding in every row but one
    log_probs, frames = onnx_export.run(onnx_export.session(tmp_path / "onnx" / "model.onnx"),
                                        audio, lengths)
    asr = load_asr(tmp_path / "sb")
    with torch.no_grad():
        expected = asr.mods.encoder(audio, lengths / lengths.max()).numpy()
    assert log_probs.shape == expected.shape
    for row, n in enumerate(frames):
        assert np.abs(log_probs[row, :n] - expected[row, :n]).max() < 1e-4
    # greedy transcripts of the padded batch are SpeechBrain's of each utterance alone
    texts = onnx_export.greedy_texts(tmp_path / "onnx", log_probs, frames)
    assert texts == [asr.transcribe_batch(row[None, :n], torch.ones(1))[0][0]
                     for row, n in zip(audio, lengths, strict=True)]
    assert sum(len(t) for t in texts) > 0


@pytest.fixture(scope="module")
def checkpoints_tool():
    spec = importlib.util.spec_from_file_location("checkpoints_tool",
                                                  REPO / "tools" / "checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--format", "ct2"], "--format ct2 is for Whisper encoder-decoder runs"),
    (["--format", "tflite"], "--format tflite: the formats are speechbrain, ct2, onnx"),
    (["--format", "onnx", "--quantization", "int8"], "--quantization is for --format ct2"),
])
def test_bad_format_arguments_are_named(args, message, ctc_run, checkpoints_tool, tmp_path):
    _, run = ctc_run
    with pytest.raises(SystemExit, match=message):
        checkpoints_tool.main(["export", str(run), str(tmp_path / "x"), *args])
    assert not (tmp_path / "x").exists()


def test_whisper_format_arguments_are_named(whisper_exports, checkpoints_tool, tmp_path,
                                            monkeypatch):
    _, run, _, _ = whisper_exports
    for args, message in [
        (["--format", "onnx"], "--format onnx is for CTC runs"),
        (["--format", "ct2", "--quantization", "int4"], "--quantization int4: CTranslate2 has"),
    ]:
        with pytest.raises(SystemExit, match=message):
            checkpoints_tool.main(["export", str(run), str(tmp_path / "x"), *args])
    monkeypatch.setattr(ct2_export, "ctranslate2", None)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[export\]"'):
        checkpoints_tool.main(["export", str(run), str(tmp_path / "x"), "--format", "ct2"])
    monkeypatch.setattr(onnx_export, "onnxruntime", None)
    with pytest.raises(SystemExit, match=r'needs the onnx and onnxruntime .* pip install -e'):
        onnx_export.require_onnxruntime()
    assert not (tmp_path / "x").exists()
