"""CTCBrain behaviour, driven in-process through the real Synthetic yaml with a micro encoder:
Noam LR per optimizer step, staged freezing, and the best-WER checkpoint policy."""

import logging

import pytest
import speechbrain as sb
import torch
from fakes import experiment


def noam(peak, warmup, step):
    return peak * warmup**0.5 * min(step**-0.5, step * warmup**-1.5)


def test_noam_lr_changes_at_every_optimizer_step(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", warmup_steps=3, lr_head=0.01,
                     lr_encoder=0.002, grad_accumulation_factor=2)
    brain, seen = exp.brain, []
    orig = brain.on_fit_batch_start

    def record(batch, should_step):  # the LR the coming optimizer step will use
        if should_step:
            seen.append((brain.optimizer_step + 1, brain.current_lrs()))
        return orig(batch, should_step)

    brain.on_fit_batch_start = record
    exp.fit()
    assert len(seen) >= 4, "need a few optimizer steps"
    for step, lrs in seen:
        assert lrs["lr_head"] == pytest.approx(noam(0.01, 3, step))
        assert lrs["lr_encoder"] == pytest.approx(noam(0.002, 3, step))
    head_lrs = [lrs["lr_head"] for _, lrs in seen]
    assert head_lrs[0] < head_lrs[1] < head_lrs[2]  # warming up
    assert head_lrs[3] < head_lrs[2]  # then decaying
    assert brain.optimizer_step == len(seen)  # one schedule step per optimizer step


def _transformer_params(brain):
    return {n: p for n, p in brain.modules.encoder.model.named_parameters()
            if not n.startswith("feature_extractor")}


def test_staged_freeze_keeps_encoder_fixed_then_trains_it(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", freeze_encoder_steps=2, freeze_cnn=True)
    brain = exp.brain
    start = {n: p.detach().clone() for n, p in _transformer_params(brain).items()}
    cnn = {n: p.detach().clone()
           for n, p in brain.modules.encoder.model.feature_extractor.named_parameters()}
    head0 = brain.modules.head.w.weight.detach().clone()
    states, orig = [], brain.on_fit_batch_end

    def record(batch, outputs, loss, should_step):
        orig(batch, outputs, loss, should_step)
        params = _transformer_params(brain)
        states.append((
            brain.optimizer_step,
            all(torch.equal(p, start[n]) for n, p in params.items()),
            all(p.grad is None for p in params.values()),
        ))

    brain.on_fit_batch_end = record
    exp.fit()
    assert len(states) >= 4
    for step, unchanged, no_grad in states:
        if step <= 2:  # frozen: no update and no gradient ever computed
            assert unchanged and no_grad, f"encoder changed while frozen at step {step}"
    assert not states[-1][1], "encoder never trained after freeze_encoder_steps"
    assert not torch.equal(brain.modules.head.w.weight, head0)
    for n, p in brain.modules.encoder.model.feature_extractor.named_parameters():
        assert torch.equal(p, cnn[n]) and not p.requires_grad, f"CNN {n} changed"


def test_always_frozen_encoder_never_changes(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", freeze_encoder_steps="always")
    start = {n: p.detach().clone() for n, p in _transformer_params(exp.brain).items()}
    exp.fit()
    assert exp.brain.optimizer_step > 0
    for n, p in _transformer_params(exp.brain).items():
        assert torch.equal(p, start[n]), n


def test_checkpointer_keeps_best_wer_and_latest_and_tests_best(synthetic_subset, tmp_path):
    # num_to_keep 1: the best checkpoint by WER and the most recent one
    exp = experiment(synthetic_subset, tmp_path / "run", number_of_epochs=3, num_to_keep=1)
    brain = exp.brain
    fake_wers = iter([50.0, 30.0, 40.0])
    real = brain._error_stats

    def scripted(loss):
        stats = real(loss)
        if brain.wer_metric is not None and getattr(brain, "test_split", None) is None:
            stats["WER"] = next(fake_wers)
        return stats

    brain._error_stats = scripted
    exp.fit()
    kept = {c.meta["epoch"]: c.meta["WER"] for c in brain.checkpointer.list_checkpoints()}
    assert kept == {2: 30.0, 3: 40.0}  # best WER + most recent; epoch 1 deleted
    brain._error_stats = real
    exp.evaluate()
    assert brain.hparams.epoch_counter.current == 2  # evaluation loaded the best-WER checkpoint
    assert (tmp_path / "run" / "wer_test.txt").exists()


def test_augmentation_grows_the_batch_and_replicates_labels(synthetic_subset, tmp_path):
    from speechbrain.augment.augmenter import Augmenter
    from speechbrain.augment.time_domain import SpeedPerturb

    exp = experiment(synthetic_subset, tmp_path / "run")
    brain = exp.brain
    brain.hparams.augmenter = Augmenter(concat_original=True,
                                        augmentations=[SpeedPerturb(16000, speeds=[90])])
    batch = next(iter(brain.make_dataloader(exp.valid, stage=sb_stage().VALID, ckpt_prefix=None,
                                            batch_size=4)))
    log_probs, wav_lens, _ = brain.compute_forward(batch, sb_stage().TRAIN)
    assert log_probs.shape[0] == 8 and wav_lens.shape[0] == 8  # clean + speed-perturbed copies
    loss = brain.compute_objectives((log_probs, wav_lens, None), batch, sb_stage().TRAIN)
    assert torch.isfinite(loss)


def sb_stage():
    import speechbrain as sb

    return sb.Stage


def test_batches_are_reshuffled_every_epoch(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", number_of_epochs=3)
    brain, order, orig = exp.brain, [], exp.brain.on_fit_batch_start

    def record(batch, should_step):
        order.append((brain.current_epoch, tuple(batch.id)))
        return orig(batch, should_step)

    brain.on_fit_batch_start = record
    exp.fit()
    epochs = [[ids for e, ids in order if e == n] for n in (1, 2, 3)]
    assert sorted(i for b in epochs[1] for i in b) == sorted(i for b in epochs[2] for i in b)
    # without set_epoch SpeechBrain's sampler repeats one order from the second epoch on
    assert epochs[0] != epochs[1] != epochs[2]


def test_resume_from_a_mid_epoch_checkpoint(synthetic_subset, tmp_path):
    """The latest checkpoint can be a step-based one; resuming from it must validate normally."""
    out = tmp_path / "run"
    exp = experiment(synthetic_subset, out, valid_every_steps=2, num_to_keep=10)
    exp.fit()
    for ckpt in exp.brain.checkpointer.list_checkpoints():
        if ckpt.meta.get("step") != 2:
            exp.brain.checkpointer.delete_checkpoints(num_to_keep=0,
                                                       ckpt_predicate=lambda c, p=ckpt.path:
                                                       c.path == p)
    kept = exp.brain.checkpointer.list_checkpoints()
    assert [c.meta["step"] for c in kept] == [2]
    assert kept[0].meta.get("end-of-epoch") is False
    again = experiment(synthetic_subset, out, valid_every_steps=2, num_to_keep=10)
    again.fit()  # recovers the mid-epoch checkpoint, finishes the epoch, validates
    assert again.brain.optimizer_step > 2
    log = (out / "train_log.txt").read_text()
    assert log.count("valid WER") >= 4


def test_bf16_autocast_keeps_the_ctc_loss_in_fp32(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", precision="bf16", eval_precision="bf16")
    brain = exp.brain
    batch = next(iter(brain.make_dataloader(exp.valid, stage=sb_stage().VALID, ckpt_prefix=None,
                                            batch_size=4)))
    with brain.training_ctx:  # what fit_batch wraps forward and loss in
        feats = brain.modules.encoder(batch.sig[0], batch.sig[1])
        log_probs, wav_lens, _ = brain.compute_forward(batch, sb_stage().TRAIN)
        loss = brain.compute_objectives((log_probs, wav_lens, None), batch, sb_stage().TRAIN)
    assert feats.dtype == torch.bfloat16  # autocast is really on for the encoder
    assert log_probs.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    exp.fit()  # a whole bf16 epoch trains
    assert brain.optimizer_step > 0


def test_augmentation_runs_in_fp32_on_the_run_device_under_autocast(synthetic_subset, tmp_path):
    """On CUDA with bf16, SpeechBrain's SpeedPerturb (CPU resampling by default) failed on a batch
    that DropFreq had turned into bf16 (found on an H100); augmentation now runs outside autocast
    in fp32, on the run's device."""
    from speechbrain.augment.augmenter import Augmenter
    from speechbrain.augment.time_domain import DropFreq, SpeedPerturb

    exp = experiment(synthetic_subset, tmp_path / "run", precision="bf16")
    brain = exp.brain
    speed = SpeedPerturb(16000, speeds=[90], device="meta")
    brain.hparams.augmenter = Augmenter(
        concat_original=False, min_augmentations=2, max_augmentations=2,
        shuffle_augmentations=False, augmentations=[DropFreq(), speed])
    wavs = torch.randn(2, 16000)
    with brain.training_ctx:
        out, lens = brain.augment(wavs, torch.ones(2))
    assert out.dtype == torch.float32 and out.shape[0] == 2
    assert speed.device == brain.device


def test_average_best_tests_the_mean_of_the_n_best_checkpoints(synthetic_subset, tmp_path):
    out = tmp_path / "run"
    exp = experiment(synthetic_subset, out, valid_every_steps=3, num_to_keep=3, average_best=3)
    exp.fit()
    best3 = exp.brain.checkpointer.find_checkpoints(min_key="WER", max_num_checkpoints=3)
    assert len(best3) == 3
    exp.brain.on_evaluate_start(min_key="WER")
    assert exp.brain.averaged_from == [c.path.name for c in best3]
    for name in ("encoder", "head"):
        states = [torch.load(c.paramfiles[name]) for c in best3]
        for key, value in exp.brain.modules[name].state_dict().items():
            if value.is_floating_point():
                mean = sum(s[key] for s in states) / 3
                assert torch.allclose(value, mean, atol=1e-6), (name, key)
    assert not torch.equal(states[0]["w.weight"], states[1]["w.weight"])  # a real average
    results = exp.evaluate()  # no validation saw the average: valid is scored as well
    assert set(results) == {"valid", "test"} and (out / "wer_valid.txt").exists()
    assert "averaged: " in (out / "train_log.txt").read_text()

    exp.brain.hparams.average_best = 5  # more than the run kept: an error naming the fix
    with pytest.raises(ValueError, match="train with num_to_keep >= 5"):
        exp.brain.on_evaluate_start(min_key="WER")


def test_a_non_finite_loss_skips_its_update_names_it_and_too_many_stop(synthetic_subset,
                                                                      tmp_path, caplog):
    """A NaN loss must not reach the weights: the batch's update is skipped and its utterances
    named; more than nonfinite_patience such batches in an epoch stop the run."""
    exp = experiment(synthetic_subset, tmp_path / "run")
    brain = exp.brain
    poisoned = sorted(exp.train.data_ids)[3]
    updates, objectives = [], brain.compute_objectives

    def poison(predictions, batch, stage):
        loss = objectives(predictions, batch, stage)
        bad = stage == sb.Stage.TRAIN and poisoned in batch.id
        if stage == sb.Stage.TRAIN:
            updates.append(bad)
        return loss * float("nan") if bad else loss

    brain.compute_objectives = poison
    with caplog.at_level(logging.WARNING, logger="speechtune.brain"):
        exp.fit()
    assert updates.count(True) == 1 and len(updates) >= 3
    assert brain.optimizer_step == len(updates)  # a skipped update still counts, as fp16's do
    assert all(torch.isfinite(p).all() for p in brain.modules.parameters())
    for opt in brain.optimizers_dict.values():  # skipped on the device: no moment, no step
        assert all(int(state["step"]) == len(updates) - 1 for state in opt.state.values())
    assert "non-finite training loss on batch [" in caplog.text and poisoned in caplog.text

    exp = experiment(synthetic_subset, tmp_path / "run2")
    exp.brain.compute_objectives = poison
    exp.brain.nonfinite_patience = 0
    with pytest.raises(ValueError, match=rf"(?s)more than nonfinite_patience=0.*{poisoned}"):
        exp.fit()


def test_out_of_memory_names_the_batch_and_how_to_shrink_it(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run")

    def oom(batch, stage):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    exp.brain.compute_forward = oom
    with pytest.raises(torch.OutOfMemoryError, match=r"(?s)training batch of \d+ utterances, "
                       r"[\d.]+ s of audio, the longest en_train_\d+ \([\d.]+ s\).*"
                       r"max_batch_seconds.*Tried to allocate"):
        exp.fit()
