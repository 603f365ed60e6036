"""SpecAugment spans drawn on the device (``speechtune.models.span_mask``), against transformers'
numpy draw."""

import numpy as np
import pytest
import torch
from fakes import experiment
from transformers.models.wavlm.modeling_wavlm import _compute_mask_indices

from speechtune.models import span_mask

#: a micro encoder's masking settings (2-frame spans: its utterances are short)
MASKING = {"mask_time_prob": 0.3, "mask_time_length": 2, "mask_feature_prob": 0.2,
           "mask_feature_length": 2}


def transformers_rates(lengths, size, prob, span, min_spans, draws):
    mask = np.zeros((len(lengths), size))
    attention = torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]
    for _ in range(draws):
        mask += _compute_mask_indices((len(lengths), size), prob, span, attention, min_spans)
    return mask / draws


@pytest.mark.parametrize("prob,span,min_spans", [(0.3, 4, 0), (0.65, 10, 2), (0.05, 2, 1)])
def test_device_spans_follow_transformers_distribution(prob, span, min_spans):
    """Per position, how often it is masked (edges less often, nothing past an utterance's end)
    matches transformers' numpy draw to sampling noise."""
    torch.manual_seed(0)
    np.random.seed(0)
    lengths, size, draws = [60, 45, 23, 9], 60, 3000
    expected = transformers_rates(lengths, size, prob, span, min_spans, draws)
    rates = sum(span_mask(len(lengths), size, prob, span, min_spans, torch.tensor(lengths))
                .double() for _ in range(draws)).numpy() / draws  # one eps per batch, as theirs
    inside = torch.arange(size)[None, :].numpy() < np.array(lengths)[:, None]
    # transformers masks the last padded position of a row it gives no span: not compared
    assert np.abs(rates - expected)[inside].max() < 0.05
    assert not rates[~inside].any()
    assert abs(rates[inside].mean() - expected[inside].mean()) < 0.01


def test_device_spans_are_whole_spans_and_a_short_row_gets_none():
    torch.manual_seed(0)
    mask = span_mask(200, 50, 0.2, 5, 1, torch.tensor([50, 4] * 100))
    assert not mask[1::2].any()  # 4 positions: no 5-long span fits
    for row in mask[0::2]:  # every run of masked positions is a union of 5-long spans
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.int().numpy(), 0])))[::2]
        assert (runs >= 5).all() and len(runs) >= 1
    assert not span_mask(3, 4, 0.5, 5, 1).any()  # shorter than a span: nothing to mask


def test_masking_compiles_without_a_graph_break(synthetic_subset, tmp_path):
    """The whole encoder forward with masking traces as one graph (a host read would break it)."""
    exp = experiment(synthetic_subset, tmp_path / "run", encoder_config_overrides=MASKING)
    model = exp.brain.modules.encoder.model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model._mask_hidden_states, fullgraph=True, backend="eager")
    hidden = torch.randn(3, 40, model.config.hidden_size)
    attention = torch.arange(40)[None, :] < torch.tensor([40, 30, 12])[:, None]
    out = compiled(hidden, attention_mask=attention.long())
    assert (out != hidden).any(dim=-1).any()
    model.eval()
    assert torch.equal(model._mask_hidden_states(hidden, attention_mask=attention.long()), hidden)
