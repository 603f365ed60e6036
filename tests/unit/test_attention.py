"""WavLM attention through SDPA computes what transformers' eager attention computes."""

import pytest
import torch
from transformers import WavLMConfig, WavLMModel

from speechtune.models import SDPAWavLMAttention, use_wavlm_attention


def _wavlm(stable_layer_norm):
    torch.manual_seed(0)
    config = WavLMConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        conv_dim=[32, 32], conv_kernel=[400, 3], conv_stride=[160, 2],
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, num_buckets=32,
        max_bucket_distance=64, do_stable_layer_norm=stable_layer_norm,
        feat_extract_norm="layer" if stable_layer_norm else "group",
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        mask_time_prob=0.0, layerdrop=0.0)
    model = WavLMModel(config)
    with torch.no_grad():  # non-trivial gates and position bias (the init leaves them near 1 / 0)
        for module in model.modules():
            if hasattr(module, "gru_rel_pos_const"):
                module.gru_rel_pos_const.uniform_(0.5, 1.5)
            if hasattr(module, "rel_attn_embed"):
                module.rel_attn_embed.weight.normal_(0, 1.0)
    return model.double()


def _run(model, wav, mask):
    """Output over real frames and the gradients of every parameter."""
    model.zero_grad()
    out = model(wav, attention_mask=mask).last_hidden_state
    frames = model._get_feature_vector_attention_mask(out.shape[1], mask)
    (out * frames[..., None]).square().sum().backward()
    return out * frames[..., None], {n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.grad is not None}


@pytest.mark.parametrize("stable_layer_norm", [True, False])
def test_sdpa_matches_eager_forward_and_backward_with_padding(stable_layer_norm):
    model = _wavlm(stable_layer_norm)
    wav = torch.randn(3, 16000, dtype=torch.float64)
    mask = torch.ones(3, 16000, dtype=torch.long)
    mask[1, 9000:] = 0  # two padded utterances of different lengths
    mask[2, 4000:] = 0
    wav = wav * mask
    eager_out, eager_grads = _run(model, wav, mask)
    use_wavlm_attention(model, "sdpa")
    assert sum(isinstance(m, SDPAWavLMAttention) for m in model.modules()) == 3
    sdpa_out, sdpa_grads = _run(model, wav, mask)

    assert (sdpa_out - eager_out).abs().max() < 1e-9
    assert sdpa_grads.keys() == eager_grads.keys()
    assert any("gru_rel_pos" in n for n in sdpa_grads)  # the gates train through the mask
    assert any("rel_attn_embed" in n for n in sdpa_grads)
    for name, grad in eager_grads.items():
        assert (sdpa_grads[name] - grad).abs().max() <= 1e-9 * max(1.0, grad.abs().max()), name

    use_wavlm_attention(model, "eager")  # and back: same numbers as the first pass
    back_out, _ = _run(model, wav, mask)
    assert torch.equal(back_out, eager_out)
