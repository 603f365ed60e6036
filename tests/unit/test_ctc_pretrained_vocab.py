"""`vocabulary: pretrained`: a CTC fine-tuned model's own vocabulary and head (wav2vec2-large-960h:
upper case, `|` between words), the case check, and models trained without attention masks."""

import pytest
import torch
from fakes import MICRO_ENCODER, REPO, VOCAB_960H
from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from speechtune.models import SSLEncoder
from speechtune.preflight import PreflightError
from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import build_experiment, load_yaml

YAML = REPO / "recipes" / "Synthetic" / "CTC" / "hparams" / "wavlm_tiny.yaml"


def experiment(data_dir, out, model_dir, **overrides):
    base = {"data_folder": str(data_dir), "output_folder": str(out), "model": model_dir,
            "freeze_cnn": True, "vocabulary": "pretrained", "target_case": "upper",
            "augmenter": None, "min_duration": 0.0, **overrides}
    return build_experiment(load_yaml(YAML, base), {"device": "cpu"}, prepare_synthetic)


def test_the_models_ids_head_and_case_are_kept(synthetic_subset, tmp_path, micro_ctc_960h_dir):
    exp = experiment(synthetic_subset, tmp_path / "run", micro_ctc_960h_dir)
    encoder = exp.brain.tokenizer
    # every id means what it meant to the pretrained head; <pad> is the blank, | the space
    expected = {"<pad>": "<blank>", "|": " "}
    assert [encoder.ind2lab[i] for i in range(len(VOCAB_960H))] == \
        [expected.get(c, c) for c in VOCAB_960H]
    hf = Wav2Vec2CTCTokenizer.from_pretrained(micro_ctc_960h_dir)
    text = "DON'T WALK TO THE RIVER"
    assert encoder.encode_sequence(list(text)) == hf(text).input_ids
    # the head starts as the pretrained CTC head
    lm_head = Wav2Vec2ForCTC.from_pretrained(micro_ctc_960h_dir).lm_head
    assert torch.equal(exp.brain.modules.head.w.weight, lm_head.weight)
    assert torch.equal(exp.brain.modules.head.w.bias, lm_head.bias)
    # targets and references are upper case, like what the head writes
    sample = exp.train[0]
    assert sample["words"] == sample["words"].upper() and sample["words"].strip()
    assert sample["tokens"].tolist() == hf(sample["words"]).input_ids


def test_lower_case_targets_stop_with_the_case_fix(synthetic_subset, tmp_path,
                                                   micro_ctc_960h_dir):
    with pytest.raises(PreflightError, match="Case mismatch.*target_case: upper"):
        experiment(synthetic_subset, tmp_path / "run", micro_ctc_960h_dir, target_case="lower")


def test_a_model_without_a_ctc_head_is_refused_with_the_fix(synthetic_subset, tmp_path,
                                                            micro_encoder_dir):
    with pytest.raises(ValueError, match="vocabulary: new"):
        experiment(synthetic_subset, tmp_path / "run", micro_encoder_dir)


def test_model_trained_without_attention_mask_gets_none(micro_ctc_960h_dir, tmp_path):
    """wav2vec2-large-960h's extractor asks for no mask: each utterance normalised by the
    extractor, zero-padded, and no mask (the short utterance then attends to the padding, as in
    transformers; with a mask its frames would differ)."""
    encoder = SSLEncoder(micro_ctc_960h_dir, str(tmp_path), freeze_feature_extractor=True,
                         output_norm=False).eval()
    assert not encoder.use_attention_mask
    torch.manual_seed(0)
    waves = [torch.randn(16000), torch.randn(11000)]
    batch = torch.zeros(2, 16000)
    batch[0], batch[1, :11000] = waves[0], waves[1]
    ours = encoder(batch, torch.tensor([1.0, 11000 / 16000]))
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(micro_ctc_960h_dir)
    padded = torch.zeros(2, 16000)
    for i, wave in enumerate(waves):
        one = extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt")
        assert "attention_mask" not in one
        padded[i, :len(wave)] = one.input_values[0]
    model = Wav2Vec2ForCTC.from_pretrained(micro_ctc_960h_dir).eval()
    with torch.no_grad():
        theirs = model.wav2vec2(padded).last_hidden_state
        masked = model.wav2vec2(padded, attention_mask=(padded != 0).long()).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours[1] - masked[1]).abs().max() > 1e-2  # the test can tell the two apart


def test_a_vocabulary_left_by_another_run_is_refused(synthetic_subset, tmp_path,
                                                     micro_ctc_960h_dir):
    """An output folder whose label_encoder.txt came from `vocabulary: new` (or another model)
    would silently misalign the pretrained head's rows."""
    out = tmp_path / "run"
    experiment(synthetic_subset, out, "tiny:wavlm", vocabulary="new", target_case="lower",
               tiny_config=MICRO_ENCODER)
    with pytest.raises(ValueError, match="written for another vocabulary.*--output_folder"):
        experiment(synthetic_subset, out, micro_ctc_960h_dir)
