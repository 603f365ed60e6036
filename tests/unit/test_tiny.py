"""The offline tiny Whisper: a local tokenizer with Whisper's special tokens that works with
SpeechBrain's Whisper wrapper and searchers (groundwork for the Whisper recipes, issue #3)."""

import csv

import pytest
import torch
from fakes import SYNTHETIC

from speechtune.text import get_normalizer
from speechtune.tiny import build_tiny_whisper

TINY = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
        "max_target_positions": 64}


def corpus_text():
    texts = []
    for lang in ("en", "da"):
        with open(SYNTHETIC / lang / "train.csv", encoding="utf-8") as f:
            texts += [row["wrd"] for row in csv.DictReader(f)]
    return texts


@pytest.fixture(scope="module", params=[True, False], ids=["multilingual", "english_only"])
def tiny_whisper(request, tmp_path_factory):
    from speechbrain.integrations.huggingface.whisper import Whisper

    path = build_tiny_whisper(tmp_path_factory.mktemp("whisper"), corpus_text(),
                              multilingual=request.param, **TINY)
    model = Whisper(path, str(tmp_path_factory.mktemp("cache")), language="da" if
                    request.param else None, task="transcribe", freeze_encoder=True)
    return request.param, model


def test_prefix_tokens(tiny_whisper):
    multilingual, model = tiny_whisper
    tokens = model.tokenizer.convert_ids_to_tokens(model.tokenizer.prefix_tokens)
    if multilingual:
        assert model.is_multilingual
        assert tokens == ["<|startoftranscript|>", "<|da|>", "<|transcribe|>", "<|notimestamps|>"]
        model.tokenizer.set_prefix_tokens(language="en")
        assert model.tokenizer.convert_ids_to_tokens(model.tokenizer.prefix_tokens)[1] == "<|en|>"
        model.tokenizer.set_prefix_tokens(language="da")
    else:  # .en models: no language and no task token
        assert not model.is_multilingual
        assert tokens == ["<|startoftranscript|>", "<|notimestamps|>"]
    assert model.eos == model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert model.no_speech == model.tokenizer.convert_tokens_to_ids("<|nocaptions|>")


def test_danish_letters_survive_tokenisation(tiny_whisper):
    _, model = tiny_whisper
    text = get_normalizer("da")("Søren spiser Æbler på Øen ved Åen")
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert model.tokenizer.unk_token_id not in ids
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_forward_and_greedy_search_run(tiny_whisper):
    from speechbrain.decoders.seq2seq import S2SWhisperGreedySearcher

    _, model = tiny_whisper
    wav = torch.randn(2, 16000) * 0.1
    prefix = torch.tensor([model.tokenizer.prefix_tokens] * 2)
    enc, logits, _ = model(wav, prefix)
    assert logits.shape[:2] == (2, prefix.shape[1]) and logits.shape[2] == model.config.vocab_size
    assert not any(p.requires_grad for p in model.model.encoder.parameters())
    searcher = S2SWhisperGreedySearcher(model, min_decode_ratio=0.0, max_decode_ratio=0.1)
    hyps, _, _, _ = searcher(enc.detach(), torch.ones(2))
    assert len(hyps) == 2
