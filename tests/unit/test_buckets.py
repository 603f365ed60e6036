"""Bucket padding (``speechtune.buckets``, ``bucket_ratio``): the ladder, the samplers that count
padded seconds with it, the padding never changing a loss, and a compiled encoder compiling once
per bucket length. The encoders are micro models built from configs: no pretrained SSL encoder
is packaged here, and Whisper's encoder (the one real model) is refused, having one input shape
already."""

import math
import random

import pytest
import speechbrain as sb
import torch
import torch._dynamo
from fakes import experiment
from torch._dynamo.utils import counters

from speechtune import buckets, data, shards
from speechtune.whisper_models import WhisperEncoder


def test_the_ladder_pads_each_length_to_the_next_power_of_the_ratio():
    rng = random.Random(0)
    for _ in range(500):
        seconds, ratio = rng.uniform(0.05, 40), rng.choice([1.1, 1.25, 1.5, 2.0])
        padded = buckets.bucket_seconds(seconds, ratio)
        k = round(math.log(padded) / math.log(ratio))
        assert padded == pytest.approx(ratio ** k) and seconds <= padded < seconds * ratio
    assert buckets.bucket_seconds(1.25, 1.25) == 1.25  # a rung is its own bucket
    rungs = buckets.boundaries(20.0, 1.25, shortest=0.5)
    assert rungs == sorted(rungs) and rungs[0] == buckets.bucket_seconds(0.5, 1.25)
    assert rungs[-1] == buckets.bucket_seconds(20.0, 1.25) and len(rungs) == 18
    assert all(b / a == pytest.approx(1.25) for a, b in zip(rungs, rungs[1:], strict=False))
    for n in (1, 15999, 16000, 16001, 123457):
        padded = buckets.bucket_samples(n, 16000, 1.25)
        assert n <= padded < n * 1.25 + 1
    with pytest.raises(ValueError, match="bucket_ratio: 1.0"):
        buckets.check_ratio(1.0)
    with pytest.raises(ValueError, match="bucket_ratio: 'yes'"):
        buckets.check_ratio("yes")


def test_padding_to_the_bucket_never_changes_a_loss(synthetic_subset, tmp_path):
    """Valid and training forward passes (eval mode: no dropout or time masking) of the same
    weights on the same batches, padded to the batch length and to the bucket length: the same
    log-probabilities on every frame, loss and hypotheses."""
    exp = experiment(synthetic_subset, tmp_path / "run", bucket_ratio=1.25)
    brain = exp.brain
    brain.modules.eval()
    loader = sb.dataio.dataloader.make_dataloader(exp.valid, batch_size=3)
    padded_more = 0
    for batch in loader:
        padded_more += buckets.bucket_samples(batch.sig[0].shape[1], 16000, 1.25) > \
            batch.sig[0].shape[1]
        for stage in (sb.Stage.VALID, sb.Stage.TRAIN):
            results = {}
            for ratio in (None, 1.25):
                brain.hparams.bucket_ratio = ratio
                brain.on_stage_start(sb.Stage.VALID)
                with torch.no_grad():
                    predictions = brain.compute_forward(batch, stage)
                    loss = brain.compute_objectives(predictions, batch, stage)
                results[ratio] = predictions, loss
            (plain, plain_loss), (padded, padded_loss) = results[None], results[1.25]
            assert padded[0].shape == plain[0].shape  # cut back to the unpadded frames
            torch.testing.assert_close(padded[0], plain[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded_loss, plain_loss, atol=1e-5, rtol=1e-5)
            assert padded[2] == plain[2]  # the same hypotheses (None in training)
    assert padded_more == len(loader)  # every batch was padded beyond its longest utterance


def test_duration_budgets_count_the_padded_length(synthetic_subset, tmp_path):
    """SpeechBrain's sampler (given the ladder) and the shard loader's batch cutter keep every
    batch's padded seconds within max_batch_seconds (a lone long utterance excepted)."""
    exp = experiment(synthetic_subset, tmp_path / "run")
    durations = {i: float(exp.train.data[i]["duration"]) for i in exp.train.data_ids}
    sampler = data.dynamic_batch_sampler(exp.train, 6.0, num_buckets=None, shuffle=True, seed=1,
                                         max_batch_ex=None, bucket_ratio=1.25)
    order = list(exp.train.data_ids)
    window = sorted(durations.items(), key=lambda item: item[1])
    cut = shards.cut_batches(window, 6.0, None, None, bucket_ratio=1.25)
    for batch in [[order[i] for i in b] for b in sampler] + cut:
        padded = buckets.bucket_seconds(max(durations[u] for u in batch), 1.25)
        assert len(batch) == 1 or len(batch) * padded <= 6.0 + 1e-9
    assert sorted(u for b in cut for u in b) == sorted(durations)
    assert sorted(order[i] for b in sampler for i in b) == sorted(durations)


def test_a_compiled_encoder_compiles_once_per_bucket(synthetic_subset, tmp_path):
    """torch.compile (dynamo's shape guards; the eager backend keeps the test fast): batches of
    several sizes and lengths in one bucket reuse one graph; a new bucket adds one; a new
    batch size never does."""
    exp = experiment(synthetic_subset, tmp_path / "run", bucket_ratio=1.25)
    brain = exp.brain
    brain.modules.eval()
    torch._dynamo.reset()
    counters.clear()
    brain.modules.encoder = torch.compile(brain.modules.encoder, backend="eager", dynamic=False)
    brain.compile = True
    buckets.allow_recompiles()
    generator = torch.Generator().manual_seed(0)
    graphs = []
    for size, seconds in [(3, 1.05), (5, 1.15), (2, 1.2), (7, 1.1), (4, 1.4), (6, 1.3)]:
        wavs = 0.1 * torch.randn(size, int(seconds * 16000), generator=generator)
        lens = torch.rand(size, generator=generator) * 0.5 + 0.5
        lens[0] = 1.0
        with torch.no_grad():
            feats, frames = brain.encode(wavs, lens)
        assert frames == brain._own_modules["encoder"].output_frames(wavs.shape[1]) < \
            feats.shape[1]
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] >= 1
    assert graphs[:4] == [graphs[0]] * 4  # 1.05-1.2 s: one bucket (1.25 s), any batch size
    assert graphs[4] == graphs[5] == 2 * graphs[0]  # 1.3-1.4 s: the next (1.5625 s)


def test_encoders_that_padding_would_change_are_refused(synthetic_subset, tmp_path,
                                                          micro_ctc_960h_dir,
                                                          micro_whisper_en_dir):
    with pytest.raises(ValueError, match="takes no attention mask"):
        experiment(synthetic_subset, tmp_path / "a", model=micro_ctc_960h_dir, tiny_config=None,
                   bucket_ratio=1.25)
    whisper = WhisperEncoder(micro_whisper_en_dir, str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="one window long"):
        buckets.check_encoder(whisper)
    with pytest.raises(ValueError, match="bucket_ratio: 0.5"):
        experiment(synthetic_subset, tmp_path / "b", bucket_ratio=0.5)
