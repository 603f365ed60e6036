"""Bucket lengths: training batches padded to a few fixed lengths, so that a compiled encoder
(``torch.compile``: SpeechBrain's ``compile: True``) compiles once per length instead of once per
batch shape (``docs/performance.md``: without buckets it recompiled at every batch and hit
torch's recompile limit).

One rule gives a batch's padded length everywhere, ``bucket_seconds``: the smallest value of the
geometric ladder ``ratio ** k`` seconds (``k`` any integer; ``bucket_ratio`` in yaml) at or above
the batch's longest utterance. With ``ratio`` 1.25 a batch carries at most 25% padding, and the
lengths from 0.5 to 30 s fall on 20 rungs. Where it is used:

- the duration-budget samplers count a batch's seconds at its padded length: SpeechBrain's
  ``DynamicBatchSampler`` gets the ladder as its ``bucket_boundaries`` (``boundaries``: it puts
  an utterance in the first bucket at or above its length and fills ``max_batch_seconds /
  boundary`` utterances per batch), the shard loader's ``cut_batches`` counts ``bucket_seconds``;
- the CTC forward pads the waveforms (after augmentation, which changes lengths) to the bucket
  length in samples (``pad``) and cuts the encoder's output back to the frames of the unpadded
  batch, so the loss and the hypotheses are those of the unpadded batch: the encoder masks the
  padding (attention mask, padded frames zeroed before the positional convolution; models
  without an attention mask are refused, ``check_encoder``).

The batch dimension is left to vary: ``mark_batch_dynamic`` tells the compiler so. In eval mode
that keeps one graph per rung used. In training, transformers' WavLM breaks the graph (its CNN
sets ``requires_grad`` on its input when the CNN trains; SpecAugment masks in numpy), and the
frames after a break get tensors the mark does not reach: they recompile per batch size unless
torch's automatic dynamic shapes are on (``compile_using_dynamic_shape_tracing: null``, the
fewest compiles measured, ``docs/performance.md``).
"""

import math

import torch
import torch._dynamo

#: recompiles allowed per compiled function with buckets on (torch's default is 8): the rungs
#: of a run's valid, test and speed-perturbed training lengths, with room
RECOMPILE_LIMIT = 64


def check_ratio(ratio):
    """``bucket_ratio``: None (off) or a number above 1."""
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 1.0 < ratio <= 4.0:
        raise ValueError(f"bucket_ratio: {ratio!r}; null (batches padded to their longest "
                         "utterance) or a number above 1 and at most 4, e.g. 1.25 (each batch "
                         "padded to the next of the lengths 1.25**k seconds)")
    return float(ratio)


def bucket_seconds(seconds, ratio):
    """The padded length of a batch whose longest utterance lasts ``seconds``: the smallest
    ``ratio ** k`` (``k`` an integer) at or above it."""
    if seconds <= 0:
        raise ValueError(f"bucket_seconds: {seconds} s; a batch lasts more than 0 s")
    k = math.floor(math.log(seconds) / math.log(ratio)) - 1
    while ratio ** k < seconds:
        k += 1
    return ratio ** k


def boundaries(longest, ratio, shortest=None):
    """The ladder's values from the bucket of ``shortest`` (default: the rung just below the
    bucket of ``longest``'s hundredth) to the bucket of ``longest`` seconds, ascending: the
    ``bucket_boundaries`` of SpeechBrain's ``DynamicBatchSampler``."""
    top = bucket_seconds(longest, ratio)
    value = bucket_seconds(shortest if shortest else longest / 100, ratio)
    rungs = [value]
    while rungs[-1] < top * (1 - 1e-9):
        rungs.append(bucket_seconds(rungs[-1] * ratio * (1 - 1e-9), ratio))
    return rungs


def bucket_samples(num_samples, sample_rate, ratio):
    """``bucket_seconds`` in samples (at least ``num_samples``)."""
    return max(num_samples, math.ceil(bucket_seconds(num_samples / sample_rate, ratio)
                                      * sample_rate - 1e-6))


def pad(wavs, wav_lens, sample_rate, ratio):
    """``wavs`` (batch, samples) zero-padded to the batch's bucket length, and ``wav_lens``
    (relative to the padded length, as SpeechBrain's batches give them) rescaled to it."""
    length = wavs.shape[1]
    target = bucket_samples(length, sample_rate, ratio)
    if target == length:
        return wavs, wav_lens
    return (torch.nn.functional.pad(wavs, (0, target - length)),
            wav_lens * (length / target))


def mark_batch_dynamic(*tensors):
    """Tell ``torch.compile`` that dimension 0 (the batch) of ``tensors`` varies, so a new batch
    size does not recompile (a batch of one is left static: the compiler specialises sizes 0
    and 1 whatever it is told)."""
    for tensor in tensors:
        if tensor.shape[0] > 1:
            torch._dynamo.mark_dynamic(tensor, 0)


def allow_recompiles():
    """Raise torch's per-function recompile limit to ``RECOMPILE_LIMIT`` (one compile per rung;
    at torch's default of 8 the ninth rung would run uncompiled)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def check_encoder(encoder):
    """Refuse bucket padding for an encoder it would change: a fixed input window (Whisper's:
    its input is one window long already), an output normalised over the padded time axis
    (SpeechBrain's ``output_norm``) or no attention mask (wav2vec2-base/large-960h: the padding
    would enter its group-norm CNN)."""
    if getattr(encoder, "window_seconds", None) is not None:
        raise ValueError("bucket_ratio: this encoder's input is always one window long "
                         "(Whisper's encoder), so its batches have one shape already; remove "
                         "bucket_ratio")
    if getattr(encoder, "output_norm", False):
        raise ValueError("bucket_ratio: the encoder's output_norm normalises over the padded "
                         "time axis, so extra padding would change its outputs; set output_norm: "
                         "False or remove bucket_ratio")
    if not getattr(encoder, "use_attention_mask", False):
        raise ValueError(f"bucket_ratio: {getattr(encoder, 'source', 'this encoder')} takes no "
                         "attention mask (its feature extractor's return_attention_mask is "
                         "false), so extra padding would change its outputs; remove "
                         "bucket_ratio")
