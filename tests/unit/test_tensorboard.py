"""TensorBoard streaming of the run history (speechtune.outputs.History / Board)."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from speechtune.outputs import History


def scalars(folder, tag):
    board = EventAccumulator(str(folder)).Reload()
    return [(e.step, e.value) for e in board.Scalars(tag)]


def test_a_resumed_run_hides_what_the_interrupted_one_logged_after_its_checkpoint(tmp_path):
    first = History(tensorboard=True, folder=tmp_path)
    for step in range(1, 11):  # killed after step 10; its last checkpoint was at step 5
        first.add_train(step, loss=100.0 + step, lrs={"lr_head": 0.1})
    first.add_valid(5, wer=50.0, cer=20.0)
    first.board.writer.flush()
    resumed = History(tensorboard=True, folder=tmp_path)
    for step in range(6, 13):
        resumed.add_train(step, loss=float(step), lrs={"lr_head": 0.2})
    resumed.add_valid(12, wer=40.0, cer=10.0)
    resumed.board.writer.close()

    loss = scalars(tmp_path, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 13))  # steps 6-10 drawn once, by the resumed run
    assert dict(loss)[5] == 105.0 and dict(loss)[6] == 6.0
    assert scalars(tmp_path, "lr/head")[-1] == (12, pytest.approx(0.2))
    assert scalars(tmp_path, "valid/WER") == [(5, 50.0), (12, 40.0)]


def test_step_time_counts_training_only(tmp_path, monkeypatch):
    clock = iter([0.0, 10.0, 15.0, 115.0, 125.0])  # train 1, train 3, valid 3, ..., train 5
    monkeypatch.setattr("speechtune.outputs.time.perf_counter", lambda: next(clock))
    history = History(tensorboard=True, folder=tmp_path)
    history.add_train(1, 1.0)
    history.add_train(3, 1.0)  # 10 s over 2 steps
    history.add_valid(3, 1.0, 1.0)  # validation ends at 15 s: the next point counts from here
    history.add_retain(4, {"en": 12.0})  # the retain sets are scored in a validation too
    history.add_train(5, 1.0)  # 10 s over 1 step since the retain scoring ended at 115 s
    history.board.writer.close()
    assert scalars(tmp_path, "train/seconds_per_step") == [(3, 5.0), (5, 10.0)]
    assert scalars(tmp_path, "retain/en_WER") == [(4, 12.0)]


def test_off_writes_nothing_and_a_bad_flag_is_named(tmp_path):
    history = History(tensorboard=False, folder=tmp_path / "tb")
    history.add_train(1, 1.0)
    history.add_valid(1, 1.0, 1.0)
    assert not (tmp_path / "tb").exists()
    with pytest.raises(ValueError, match="tensorboard: 'yes': True or False"):
        History(tensorboard="yes", folder=tmp_path)
