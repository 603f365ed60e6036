"""The training step without host reads (``speechtune.step``)."""

import ast
import collections
import contextlib
import math
import traceback
from types import SimpleNamespace

import pytest
import speechbrain as sb
import torch
from fakes import experiment
from test_time_masking import MASKING
from test_whisper import experiment as whisper_experiment

from speechtune import step as step_module
from speechtune.step import running_average

#: the Tensor methods that copy a value to the host (on a GPU: wait for every queued kernel)
HOST_READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def host_reads():
    """Count the calls to ``HOST_READS`` while the block runs, by the speechtune, SpeechBrain or
    transformers function that made them."""
    seen, saved = collections.Counter(), {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, method):
        def read(self, *args, **kwargs):
            caller = [f for f in traceback.extract_stack()[:-1] if any(
                k in f.filename for k in ("speechtune", "speechbrain", "transformers"))]
            where = f"{caller[-1].filename}:{caller[-1].name}" if caller else "?"
            seen[(name, where)] += 1
            return method(self, *args, **kwargs)
        return read

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        yield seen
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_device_average_is_speechbrains_bit_for_bit():
    losses = [2.5, 1.75, float("nan"), 1.2345678, float("inf"), 0.9876543, 3.3333333, 0.1]
    brain = SimpleNamespace(step=0)
    host, device = 0.0, torch.tensor(0.0, dtype=torch.float64)
    for step, value in enumerate(losses, start=1):
        brain.step = step
        loss = torch.tensor(value)  # float32, as a loss is
        host = sb.Brain.update_average(brain, loss, host)
        device = running_average(device, loss, step)
        assert float(device) == host  # equal, not close


def test_the_logged_losses_are_speechbrains(synthetic_subset, tmp_path):
    """The epoch's train loss and the curve's points are what SpeechBrain's step logged: its
    running average over the batch losses, and the loss of each logging step's batch."""
    exp = experiment(synthetic_subset, tmp_path / "run", number_of_epochs=2, log_every_steps=2)
    brain, losses, valid, epochs = exp.brain, [], [], []
    objectives, stage_end, end_valid = brain.compute_objectives, brain.on_stage_end, \
        brain._end_valid

    def record(predictions, batch, stage):
        loss = objectives(predictions, batch, stage)
        kept = losses if stage == sb.Stage.TRAIN else valid
        kept.append((brain.current_epoch, brain.optimizer_step + 1, float(loss.detach())))
        return loss

    def end(stage, stage_loss, epoch=None):
        stage_end(stage, stage_loss, epoch)
        if stage == sb.Stage.TRAIN:
            epochs.append(brain.train_stats["loss"])

    def validated(loss, end_of_epoch):
        epochs.append(loss)
        return end_valid(loss, end_of_epoch)

    brain.compute_objectives, brain.on_stage_end, brain._end_valid = record, end, validated
    exp.fit()

    def speechbrains_average(values):
        average, probe = 0.0, SimpleNamespace(step=0)
        for probe.step, value in enumerate(values, start=1):
            average = sb.Brain.update_average(probe, torch.tensor(value), average)
        return average

    expected = [speechbrains_average([v for e, _, v in kept if e == epoch])
                for epoch in (1, 2) for kept in (losses, valid)]
    assert epochs == expected  # train, valid, train, valid
    assert brain.hparams.history.train == [[step, value] for _, step, value in losses
                                           if step % 2 == 0]
    assert len(brain.hparams.history.train) >= 4


def reads_in_three_steps(exp):
    """Run three training steps of ``exp`` (the third a logging step: ``log_every_steps=3``);
    for each, the progress bar's reads and the other host reads."""
    brain = exp.brain
    brain.on_fit_start()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    brain.modules.train()
    brain.nonfinite_count = 0  # as SpeechBrain's _fit_train sets it
    loader = brain.make_dataloader(exp.train, sb.Stage.TRAIN, ckpt_prefix=None,
                                   **exp.loader_kwargs["train"])
    batches, reads = iter(loader), []
    for _ in range(3):
        batch = next(batches)
        with host_reads() as seen:
            brain.step += 1
            loss = brain.fit_batch(batch)
            brain.avg_train_loss = brain.update_average(loss, brain.avg_train_loss)
        shown = seen.pop(("__float__", f"{step_module.__file__}:push"), 0)  # the progress bar's
        reads.append((shown, dict(seen)))
    assert brain.optimizer_step == 3
    assert math.isfinite(brain.avg_train_loss) and brain.avg_train_loss > 0
    return reads


def test_a_training_step_reads_nothing_from_the_device(synthetic_subset, tmp_path):
    """Between logging steps a step (forward with SpecAugment masks, CTC loss, backward, fused
    AdamW update, running average) leaves the host nothing to wait for; a logging step reads.
    The one read is the progress bar's copy of the average, which on a GPU reads a copy that
    has landed (``LaggedRead``) and on the CPU is on the host already."""
    reads = reads_in_three_steps(experiment(synthetic_subset, tmp_path / "run", log_every_steps=3,
                                            encoder_config_overrides=MASKING))
    assert reads[0] == (1, {}) and reads[1] == (1, {}), reads[:2]
    assert reads[2][1], "the third step logs: it reads"


def test_a_whisper_training_step_reads_nothing_from_the_device(synthetic_subset, tmp_path):
    """The same for Whisper's step (log-mel, frozen encoder, decoder with its causal mask, NLL).
    An encoder cache's first epoch copies each output to the host: that is what it keeps."""
    exp = whisper_experiment(synthetic_subset, tmp_path / "run", log_every_steps=3)
    reads = reads_in_three_steps(exp)
    assert reads[0] == (1, {}) and reads[1] == (1, {}), reads[:2]


@pytest.mark.parametrize("fused", [True, None])
def test_a_non_finite_batch_is_skipped_and_named_at_the_next_read(synthetic_subset, tmp_path,
                                                                 fused):
    """Fused AdamW skips the update on the device; torch's default optimizer after one host read
    of the flag. Either way the weights and moments stay finite, and the batch is named."""
    exp = experiment(synthetic_subset, tmp_path / "run", fused_adamw=fused, log_every_steps=100)
    brain, objectives, named = exp.brain, exp.brain.compute_objectives, []
    poisoned = sorted(exp.train.data_ids)[0]

    def poison(predictions, batch, stage):
        loss = objectives(predictions, batch, stage)
        return loss * float("nan") if poisoned in batch.id else loss

    brain.compute_objectives = poison
    brain.nonfinite_batch = lambda ids: named.append((brain.optimizer_step, list(ids)))
    exp.fit()
    assert len(named) == 1 and poisoned in named[0][1]
    assert named[0][0] == brain.optimizer_step  # read at the epoch's end (no log step before)
    for opt in brain.optimizers_dict.values():
        assert opt.defaults["fused"] is fused
        for state in opt.state.values():
            assert int(state["step"]) == brain.optimizer_step - 1
            assert all(torch.isfinite(state[k]).all() for k in ("exp_avg", "exp_avg_sq"))
    assert all(torch.isfinite(p).all() for p in brain.modules.parameters())


def _read_twice(rank, init_file, out):
    """One DDP process making two reads: before the first, a batch of rank 1 was non-finite;
    before the second, one of rank 0. Writes the count after each read, or the error."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    brain = step_module.DeviceStep.__new__(step_module.DeviceStep)  # the reads alone: no Brain
    brain.__dict__.update(distributed_launch=True, device="cpu", nonfinite_patience=1,
                          nonfinite_count=0, current_epoch=1, avg_train_loss=0.0,
                          _loss_average=None)
    said = []
    try:
        for bad in ([rank == 1, False], [rank == 0]):
            brain._unread = [([f"r{rank}b{i}"], torch.tensor(flag)) for i, flag in enumerate(bad)]
            brain.read_train_state()
            said.append(brain.nonfinite_count)
    except ValueError as err:
        said.append(str(err))
    finally:
        torch.distributed.destroy_process_group()
    (out / f"rank{rank}.txt").write_text(repr(said))


def test_under_ddp_every_process_counts_all_non_finite_batches_and_all_stop_together(tmp_path):
    """Each process sees only its own batches' flags; a process that counted only its own would
    go on (one bad batch each: within ``nonfinite_patience=1``) or stop alone while the others
    wait in their next collective. The count is summed at each read, so both stop at the second."""
    torch.multiprocessing.spawn(_read_twice, args=(tmp_path / "init", tmp_path), nprocs=2)
    said = [ast.literal_eval((tmp_path / f"rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert [s[0] for s in said] == [1, 1]  # rank 1's bad batch, counted on both
    assert "2 training batches" in said[0][1] and "held [r0b0]" in said[0][1]
    assert "2 training batches" in said[1][1] and "were finite" in said[1][1]
