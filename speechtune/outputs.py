"""Run outputs: the training history (checkpointed, so curves survive a resume), its plot and
its live TensorBoard stream, and the per-group test tables."""

import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from speechbrain.utils import checkpoints  # noqa: E402
from speechbrain.utils.distributed import if_main_process  # noqa: E402

from speechtune.metrics import group_rows, write_group_report  # noqa: E402


@checkpoints.register_checkpoint_hooks
class History:
    """Train loss and valid WER/CER against optimizer steps; with ``tensorboard`` True, also
    streamed to TensorBoard event files in ``folder`` as the run goes (``Board``)."""

    def __init__(self, tensorboard=False, folder=None):
        self.train = []  # [step, loss]
        self.valid = []  # [step, WER, CER]
        self.retain = []  # [step, {retain split: WER}] (speechtune.retain)
        if tensorboard not in (True, False):
            raise ValueError(f"tensorboard: {tensorboard!r}: True or False")
        self.board = Board(folder) if tensorboard else None

    def add_train(self, step, loss, lrs=None):
        """A train-loss point; ``lrs`` (``{lr_<group>: LR}``) goes to TensorBoard only."""
        self.train.append([step, loss])
        if self.board:
            self.board.train(step, loss, lrs or {})

    def add_valid(self, step, wer, cer):
        self.valid.append([step, wer, cer])
        if self.board:
            self.board.scalars(step, {"valid/WER": wer, "valid/CER": cer})

    def add_retain(self, step, scores):
        self.retain.append([step, dict(scores)])
        if self.board:
            self.board.scalars(step, {f"retain/{name}_WER": wer for name, wer in scores.items()})

    @checkpoints.mark_as_saver
    def save(self, path):
        with open(path, "w") as f:
            json.dump({"train": self.train, "valid": self.valid, "retain": self.retain}, f)

    @checkpoints.mark_as_loader
    def load(self, path, end_of_epoch=False):
        del end_of_epoch
        with open(path) as f:
            data = json.load(f)
        self.train, self.valid = data["train"], data["valid"]
        self.retain = data.get("retain", [])  # absent in checkpoints of runs without it


class Board:
    """TensorBoard event files in ``folder``, written by the main process against the optimizer
    step: ``train/loss``, ``lr/<group>``, ``train/seconds_per_step`` (wall time per optimizer
    step since the previous train point, validation excluded), ``valid/WER``, ``valid/CER``,
    ``retain/<set>_WER``.

    torch's ``SummaryWriter`` writes them. SpeechBrain's ``TensorboardLogger`` wraps the same
    writer, but counts its own x-axis from 0 in every process, so a resumed run would draw over
    the first one's curve. Here the writer opens at the first point a process logs, with
    ``purge_step`` at that step: a resumed run hides what the interrupted one logged after the
    checkpoint it resumed from, and the curves continue without a doubled stretch."""

    def __init__(self, folder):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("tensorboard: True needs the tensorboard package: pip install -e "
                              "\".[tensorboard]\" (or turn it off: --tensorboard=False)") from err
        self.folder, self._writer_class = str(folder), SummaryWriter
        self.writer = None
        self._since = None  # (wall clock, step) the next train point's step time counts from

    def _write(self, step, values):
        if not if_main_process():
            return
        if self.writer is None:
            self.writer = self._writer_class(self.folder, purge_step=step, flush_secs=10)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def train(self, step, loss, lrs):
        """A train point: loss, LRs and the seconds per optimizer step since the last point."""
        values = {"train/loss": loss, **{f"lr/{k.removeprefix('lr_')}": v for k, v in lrs.items()}}
        now = time.perf_counter()
        if self._since is not None and step > self._since[1]:
            values["train/seconds_per_step"] = (now - self._since[0]) / (step - self._since[1])
        self._since = (now, step)
        self._write(step, values)

    def scalars(self, step, values):
        """Validation results; flushed at once (they are few), and the step time restarts after
        them (validation is not training time)."""
        self._write(step, values)
        if self.writer is not None:
            self.writer.flush()
        self._since = (time.perf_counter(), step)


def write_curves(history, path):
    """PNG with train loss (left axis) and valid WER/CER (right axis) against optimizer steps."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if history.train:
        steps, losses = zip(*history.train, strict=True)
        ax.plot(steps, losses, color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    if history.valid:
        steps, wers, cers = zip(*history.valid, strict=True)
        ax2.plot(steps, wers, "o-", color="tab:red", label="valid WER")
        ax2.plot(steps, cers, "s--", color="tab:orange", label="valid CER")
    for split in sorted({s for _, scores in history.retain for s in scores}):
        points = [(step, scores[split]) for step, scores in history.retain if split in scores]
        ax2.plot(*zip(*points, strict=True), "^:", label=f"{split} WER (kept?)")
    ax2.set_ylabel("valid error rate (%)", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax2.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_groups(wer_scores, cer_scores, groups, split, stem, resamples, seed):
    """``speechtune.metrics.group_rows`` of a test split written to ``<stem>.md`` /
    ``<stem>.csv``; returns the Markdown."""
    rows = group_rows(wer_scores, cer_scores, groups, resamples, seed)
    return write_group_report(rows, split, resamples, f"{stem}.md", f"{stem}.csv")
