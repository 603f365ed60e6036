"""tools/checkpoints.py: list and best agree with what the training run logged."""

import json
import re
import subprocess
import sys

import pytest
from fakes import REPO, SYNTHETIC, experiment, write_subset
from speechbrain.utils.checkpoints import Checkpointer

TOOL = REPO / "tools" / "checkpoints.py"


def tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Validations every 3 steps and at epoch ends; the best and the 2 latest kept."""
    data = tmp_path_factory.mktemp("data")
    write_subset(SYNTHETIC / "en", data / "en", {"train": 24, "valid": 6, "test": 6})
    out = tmp_path_factory.mktemp("run")
    exp = experiment(data, out, number_of_epochs=1, valid_every_steps=3, num_to_keep=2)
    exp.fit()
    return out


def logged_valid_wers(run):
    """``{(epoch, step): valid WER}`` from the run's train_log.txt."""
    found = {}
    for line in (run / "train_log.txt").read_text().splitlines():
        m = re.match(r"epoch: (\d+), step: (\d+),.* valid WER: ([0-9.e+]+)", line)
        if m:
            found[(int(m[1]), int(m[2]))] = float(m[3])
    return found


def test_list_and_best_agree_with_the_training_log(finished_run):
    done = tool("list", finished_run, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    logged = logged_valid_wers(finished_run)
    assert len(rows) >= 2 and len(logged) >= 3
    for row in rows:  # every kept checkpoint is a logged validation, with its WER
        assert logged[(row["epoch"], row["step"])] == pytest.approx(row["WER"], rel=1e-2)
    best_rows = [r for r in rows if r["best"]]
    assert len(best_rows) == 1 and best_rows[0]["WER"] == pytest.approx(min(logged.values()),
                                                                         rel=1e-2)
    tested = Checkpointer(finished_run / "save").find_checkpoint(min_key="WER")  # train.py's
    best = tool("best", finished_run)
    assert best.returncode == 0 and best.stdout.strip() == best_rows[0]["path"] == str(
        tested.path)
    table = tool("list", finished_run / "save").stdout  # the save folder itself works too
    assert table.count("\n| best |") == 1 and table.count("CKPT+") == len(rows)


def test_a_folder_without_checkpoints_is_a_clear_error(tmp_path):
    done = tool("best", tmp_path)
    assert done.returncode != 0 and "no checkpoints (CKPT+* folders)" in done.stderr
