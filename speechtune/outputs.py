"""Run outputs: the training history (checkpointed, so curves survive a resume) and its plot, and
the per-group test tables."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from speechbrain.utils import checkpoints  # noqa: E402

from speechtune.metrics import group_rows, write_group_report  # noqa: E402


@checkpoints.register_checkpoint_hooks
class History:
    """Train loss and valid WER/CER against optimizer steps."""

    def __init__(self):
        self.train = []  # [step, loss]
        self.valid = []  # [step, WER, CER]
        self.retain = []  # [step, {retain split: WER}] (speechtune.retain)

    def add_train(self, step, loss):
        self.train.append([step, loss])

    def add_valid(self, step, wer, cer):
        self.valid.append([step, wer, cer])

    def add_retain(self, step, scores):
        self.retain.append([step, dict(scores)])

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
