"""SSL encoders (WavLM, wav2vec2, HuBERT): SpeechBrain's Hugging Face wrapper with config
overrides, per-utterance normalisation, WavLM attention through SDPA and SpecAugment masking
drawn on the device.

The source is what the yaml's ``model`` key resolves to (``speechtune.tiny.resolve_source``): a hub
id (``microsoft/wavlm-large``) or a local folder in HF format. The Whisper wrappers are
``speechtune.whisper_models``; random-init models built from a config are ``speechtune.tiny``.
"""

import contextlib
import logging
import types
import warnings

import torch
import torch.nn.functional as F
from speechbrain.dataio.dataio import length_to_mask
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from transformers import AutoModelForCTC, AutoTokenizer
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

logger = logging.getLogger(__name__)


class SSLEncoder(Wav2Vec2):
    """WavLM / wav2vec2 / HuBERT encoder (``AutoModel``) with HF config overrides from yaml.

    Arguments are those of SpeechBrain's ``Wav2Vec2`` plus ``config_overrides``, a dict applied to
    the HF config before the weights load (e.g. ``layerdrop``, ``mask_time_prob``), and
    ``attention``: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``) or ``eager``.
    transformers runs WavLM's attention eagerly whatever the config says (its gated relative
    position bias); ``sdpa`` swaps in ``SDPAWavLMAttention``, the same math through the fused
    kernel. Other models get transformers' own implementation of the name.
    """

    #: SSL encoders take any input length (Whisper's encoder has a window: ``WhisperEncoder``)
    window_seconds = model_window_seconds = None

    def __init__(self, source, save_path, config_overrides=None, attention="sdpa", **kwargs):
        object.__setattr__(self, "_config_overrides", dict(config_overrides or {}))
        with quiet_speechbrain_init():
            super().__init__(source, save_path, **kwargs)
        self.source, self.save_path = str(source), str(save_path)
        # transformers' rule: models trained without attention masks (wav2vec2-base/large-960h:
        # group-norm CNN, `return_attention_mask: false`) get zero-padded input (the batch's
        # padding) and no mask
        self.use_attention_mask = bool(getattr(self.feature_extractor, "return_attention_mask",
                                               True))
        if self.freeze_feature_extractor and not self.freeze:
            # SpeechBrain turns off the CNN's parameter gradients but not transformers' own flag,
            # with which the CNN makes its input require grad in training: autograd then ran
            # backward through all seven conv layers for nothing (seen in an H100 profile)
            self.model.feature_extractor._freeze_parameters()
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"attention={attention!r}: use 'sdpa' or 'eager'")
        if self.model.config.model_type == "wavlm":
            use_wavlm_attention(self.model, attention)
        else:
            self.model.set_attn_implementation(attention)
        mask_on_device(self.model)

    def override_config(self, config):
        """Apply ``config_overrides`` (unknown attribute names are an error)."""
        apply_config_overrides(config, self._config_overrides)
        if not hasattr(config, "mask_feature_min_masks"):
            # transformers' WavLMConfig lacks this attribute that its channel masking reads
            # (AttributeError as soon as mask_feature_prob > 0); 0 is Wav2Vec2Config's default.
            config.mask_feature_min_masks = 0
        return config

    def extract_features(self, wav, wav_lens=None):
        """SpeechBrain's forward with each utterance normalised over its own samples, and the
        padding mask built at the batch's padded length.

        SpeechBrain layer-norms every row of the padded batch, padding included, so an
        utterance's features depended on the longest utterance it was batched with, and differed
        from transformers' feature extractor (per utterance, zero mean and unit variance over its
        true length, padding 0) that an exported model meets at inference. Its mask was as long
        as the longest utterance, found with ``.item()``: a host sync in every step and, under
        ``torch.compile``, a graph break and a recompile for every new longest length.
        """
        if self.normalize_wav:
            wav = normalize_per_utterance(wav, wav_lens)
        mask = None
        if self.use_attention_mask and wav_lens is not None:  # max_len given: no .item()
            mask = length_to_mask(torch.round(wav_lens * wav.shape[1]), max_len=wav.shape[1],
                                  dtype=torch.bool)
        out = self.model(wav, attention_mask=mask, output_hidden_states=self.output_all_hiddens)
        if self.output_all_hiddens:
            out = torch.stack(list(out.hidden_states), dim=0)
            return F.layer_norm(out, out.shape[-2:]) if self.output_norm else out
        out = out.last_hidden_state
        return F.layer_norm(out, out.shape[1:]) if self.output_norm else out

    def pretrained_ctc(self):
        """The source model's own CTC vocabulary and head: ``(labels in id order, blank id,
        word delimiter, unk token, {"weight", "bias"})``, for ``vocabulary: pretrained``."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.source, cache_dir=self.save_path)
            model = AutoModelForCTC.from_pretrained(self.source, cache_dir=self.save_path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"vocabulary: pretrained needs a CTC fine-tuned model with its tokenizer "
                f"(vocab.json and a *ForCTC head, e.g. facebook/wav2vec2-large-960h); "
                f"{self.source} has none ({err}). Use vocabulary: new for a pretrained-only "
                "encoder.") from err
        vocab = tokenizer.get_vocab()
        labels = [None] * len(vocab)
        for label, index in vocab.items():
            labels[index] = label
        if model.lm_head.out_features != len(labels) or None in labels:
            raise ValueError(f"{self.source}: its CTC head has {model.lm_head.out_features} "
                             f"outputs but its tokenizer {len(vocab)} ids")
        if tokenizer.unk_token not in vocab:
            raise ValueError(f"{self.source}: its tokenizer has no unknown token for characters "
                             "outside its vocabulary")
        head = {k: v.detach().clone() for k, v in model.lm_head.state_dict().items()}
        return (labels, model.config.pad_token_id, getattr(tokenizer, "word_delimiter_token", "|"),
                tokenizer.unk_token, head)

    def output_frames(self, num_samples: int) -> int:
        """Number of encoder frames for ``num_samples`` input samples (the CNN's arithmetic)."""
        n = self.model._get_feat_extract_output_lengths(torch.tensor(num_samples))
        return int(n)


@contextlib.contextmanager
def quiet_speechbrain_init():
    """SpeechBrain's Hugging Face wrappers call ``gradient_checkpointing_disable``, which
    transformers 5.25 deprecates with a FutureWarning on every run: a warning no user of ours
    can act on, silenced here (and only it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`gradient_checkpointing_disable` is "
                                "deprecated", category=FutureWarning)
        yield


def apply_config_overrides(config, overrides):
    """Set each ``{attribute: value}`` of ``overrides`` on an HF ``config`` before its model
    loads; a name the config does not have is an error, not a silent new attribute."""
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"config_overrides: {type(config).__name__} has no '{key}'")
        setattr(config, key, value)
    return config


def normalize_per_utterance(wav, wav_lens=None, eps=1e-7):
    """Zero mean, unit variance over each utterance's true length (relative ``wav_lens``), padding
    set to 0: transformers' ``Wav2Vec2FeatureExtractor(do_normalize=True)`` in torch."""
    if wav_lens is None:
        wav_lens = torch.ones(wav.shape[0], device=wav.device)
    lengths = (wav_lens * wav.shape[1]).round().clamp(min=1)
    mask = (torch.arange(wav.shape[1], device=wav.device)[None, :] < lengths[:, None]).to(wav.dtype)
    mean = (wav * mask).sum(dim=1, keepdim=True) / lengths[:, None]
    var = (((wav - mean) * mask) ** 2).sum(dim=1, keepdim=True) / lengths[:, None]
    return (wav - mean) / torch.sqrt(var + eps) * mask


class SDPAWavLMAttention(WavLMAttention):
    """WavLM self-attention through ``scaled_dot_product_attention`` (same parameters and math).

    transformers computes it with ``F.multi_head_attention_forward`` and full attention weights.
    Here the gated relative-position bias (and ``-inf`` on padded keys) is the additive mask of
    SDPA, which then runs its memory-efficient kernel on GPU. The ungated bias is computed once by
    the first layer and handed on as ``(1, heads, T, T)`` instead of one copy per utterance.
    """

    def forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
        bsz, length, _ = hidden_states.shape
        heads, head_dim = self.num_heads, self.head_dim
        if position_bias is None:
            position_bias = self.compute_bias(length, length).unsqueeze(0)
        per_head = hidden_states.view(bsz, length, heads, head_dim).transpose(1, 2)
        proj = self.gru_rel_pos_linear(per_head).view(bsz, heads, length, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0

        def split(proj_layer):
            return proj_layer(hidden_states).view(bsz, length, heads, head_dim).transpose(1, 2)

        query, key, value = split(self.q_proj), split(self.k_proj), split(self.v_proj)
        # the (batch, heads, T, T) mask in one kernel, in the attention's dtype: -inf on padded
        # keys + gate x bias (transformers adds the same bias in fp32, then casts it)
        keys = torch.zeros(bsz, 1, 1, length, dtype=query.dtype, device=query.device)
        if attention_mask is not None:
            keys = keys.masked_fill(attention_mask.ne(1)[:, None, None, :], float("-inf"))
        bias = torch.addcmul(keys, gate.to(query.dtype), position_bias.to(query.dtype))
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, length, heads * head_dim))
        return out, None, position_bias


def use_wavlm_attention(model, attention):
    """Switch every WavLM attention layer of ``model`` to ``sdpa`` or ``eager`` (in place; the
    parameters, and so checkpoints, are untouched)."""
    cls = SDPAWavLMAttention if attention == "sdpa" else WavLMAttention
    for module in model.modules():
        if isinstance(module, WavLMAttention):
            module.__class__ = cls
    return model


def mask_on_device(model):
    """Draw ``model``'s SpecAugment masks (``mask_time_prob``, ``mask_feature_prob``) on the
    device: ``span_mask`` replaces transformers' ``_mask_hidden_states`` on this instance.

    transformers draws them with numpy on the host after reading every utterance's frame count
    (``.tolist()``, a host sync per training step on a GPU), then writes them through boolean
    indexing (another); under ``torch.compile`` both break the graph. The spans follow the same
    rule (below); the random draws differ."""
    if not hasattr(model, "_mask_hidden_states"):  # transformers' private hook, checked here
        raise TypeError(f"{type(model).__name__} has no _mask_hidden_states: this transformers "
                        "version masks differently; speechtune's time masking needs updating")
    model._mask_hidden_states = types.MethodType(_mask_hidden_states, model)
    return model


def _mask_hidden_states(model, hidden_states, mask_time_indices=None, attention_mask=None):
    """transformers' rule: no masking without ``apply_spec_augment``; given time indices are
    applied, else spans are drawn in training."""
    config = model.config
    if not getattr(config, "apply_spec_augment", True):
        return hidden_states
    batch, frames, width = hidden_states.shape
    if mask_time_indices is None and config.mask_time_prob > 0 and model.training:
        lengths = None if attention_mask is None else attention_mask.sum(-1)
        mask_time_indices = span_mask(batch, frames, config.mask_time_prob,
                                      config.mask_time_length, config.mask_time_min_masks,
                                      lengths, hidden_states.device)
    if mask_time_indices is not None:
        embed = model.masked_spec_embed.to(hidden_states.dtype)
        hidden_states = torch.where(mask_time_indices[..., None], embed, hidden_states)
    if config.mask_feature_prob > 0 and model.training:
        channels = span_mask(batch, width, config.mask_feature_prob, config.mask_feature_length,
                             config.mask_feature_min_masks, None, hidden_states.device)
        hidden_states = hidden_states.masked_fill(channels[:, None, :], 0)
    return hidden_states


def span_mask(batch, size, prob, span, min_spans, lengths=None, device=None):
    """SpecAugment spans as transformers' ``_compute_mask_indices`` draws them, on the device and
    without a host read: a ``(batch, size)`` bool mask.

    Row ``b`` (``lengths[b]`` positions of ``size`` are real; None: all) gets ``n`` spans of
    ``span`` positions, ``n = int(prob * length / span + eps)`` (``eps`` uniform in [0, 1), one
    per batch), at least ``min_spans``, at most what fits (``size // span`` and ``length - span +
    1``); their starts are distinct and uniform over ``0 .. length - span``, so every span ends
    inside the utterance. Spans may overlap: ``prob`` bounds the masked share from above. A row
    too short for one span gets none (transformers raises when the whole batch is)."""
    lengths = (torch.full((batch,), size, device=device) if lengths is None
               else lengths.to(device=device, dtype=torch.long))
    starts = size - span + 1  # start positions a span fits in, in the padded length
    if starts < 1:
        return torch.zeros(batch, size, dtype=torch.bool, device=device)
    count = (prob * lengths / span + torch.rand((), device=device)).floor().long()
    count = count.clamp(min=min_spans).clamp(max=size // span)
    count = torch.minimum(count, (lengths - span + 1).clamp(min=0))
    most = min(starts, max(int(prob * size / span + 1), min_spans, 1))  # a bound on every count
    fits = torch.arange(starts, device=device)[None, :] < (lengths - span + 1)[:, None]
    draws = torch.where(fits, torch.rand(batch, starts, device=device), 2.0)  # unfit last
    picked = draws.topk(most, dim=1, largest=False).indices  # a uniform sample, in draw order
    kept = torch.arange(most, device=device)[None, :] < count[:, None]
    first = torch.zeros(batch, size, device=device).scatter(1, picked, kept.float())
    return F.max_pool1d(F.pad(first[:, None], (span - 1, 0)), span, stride=1)[:, 0].bool()
