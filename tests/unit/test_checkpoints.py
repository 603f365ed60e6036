"""Checkpoints appear whole or not at all: a full disk or a SIGKILL during a save leaves the
earlier checkpoints as the ones every reader (resume, tools/checkpoints.py, export) finds."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from speechtune.checkpoints import AtomicCheckpointer


class Disk:
    """A recoverable whose save fails like a full disk when told to."""

    def __init__(self):
        self.full = False

    def save(self, path):
        if self.full:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        torch.save({"ok": True}, path)

    def load(self, path, end_of_epoch=True):
        torch.load(path)


def checkpointer(folder, disk=None):
    recoverables = {"model": torch.nn.Linear(2, 2)}
    hooks = {}
    if disk is not None:
        recoverables["disk"] = disk
        hooks = {"disk": Disk.save}
    ckpt = AtomicCheckpointer(folder, recoverables=recoverables, custom_save_hooks=hooks,
                              custom_load_hooks={"disk": Disk.load} if disk else None)
    return ckpt


def test_a_full_disk_keeps_the_earlier_checkpoints_and_says_what_to_do(tmp_path):
    disk = Disk()
    ckpt = checkpointer(tmp_path, disk)
    ckpt.save_and_keep_only(meta={"WER": 40.0}, min_keys=["WER"])
    first = ckpt.find_checkpoint(min_key="WER")
    disk.full = True
    with pytest.raises(OSError, match=r"Could not write a checkpoint in .*No space left.*Free "
                                      r"disk space.*rerunning the command resumes"):
        ckpt.save_and_keep_only(meta={"WER": 30.0}, min_keys=["WER"])
    assert len(list(tmp_path.glob("CKPT+*"))) == 2  # the torn save is on disk ...
    for reader in (ckpt, Checkpointer(tmp_path)):  # ... but no reader takes it
        assert [c.path for c in reader.list_checkpoints()] == [first.path]
    disk.full = False
    ckpt.save_and_keep_only(meta={"WER": 30.0}, min_keys=["WER"])
    kept = sorted(p.name for p in tmp_path.glob("CKPT+*"))
    assert len(kept) == 1 and first.path.name not in kept  # torn one removed, best kept


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_to_resume(tmp_path):
    """A real process killed while it writes a checkpoint's files."""
    script = textwrap.dedent(f"""
        import time, torch
        from speechtune.checkpoints import AtomicCheckpointer
        slow = {{"wait": False}}
        def save(obj, path):
            torch.save({{}}, path)
            if slow["wait"]:
                print("writing", flush=True)
                time.sleep(60)
        ckpt = AtomicCheckpointer({str(tmp_path)!r}, recoverables={{"model": torch.nn.Linear(2, 2),
                                  "slow": slow}}, custom_save_hooks={{"slow": save}})
        ckpt.save_checkpoint(meta={{"WER": 50.0}})
        slow["wait"] = True
        ckpt.save_checkpoint(meta={{"WER": 10.0}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(list(tmp_path.glob("CKPT+*"))) == 2
    best = Checkpointer(tmp_path).find_checkpoint(min_key="WER")
    assert best.meta["WER"] == 50.0  # not the torn 10.0
    resumed = AtomicCheckpointer(tmp_path, recoverables={"model": torch.nn.Linear(2, 2)})
    assert resumed.recover_if_possible().meta["WER"] == 50.0  # loads without error


def test_an_unwritable_results_folder_stops_before_any_work(tmp_path):
    from fakes import REPO

    from speechtune.recipe import load_hparams

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    yaml = REPO / "recipes" / "Synthetic" / "CTC" / "hparams" / "wavlm_tiny.yaml"
    with pytest.raises(OSError, match=r"output_folder .*a_file/run cannot be written .*Pass "
                                      r"--output_folder="):
        load_hparams([str(yaml), f"--output_folder={blocker / 'run'}"])


def test_each_process_resumes_its_own_random_generators(tmp_path, monkeypatch):
    """Under DDP every process saves its generators' states (the main process in ``rng.ckpt``,
    process r in ``rng.rank<r>.ckpt``) and draws on from its own; a process that has no file
    (resumed with more processes) takes the main process's states."""
    from speechtune.checkpoints import RNGState

    drawn = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        torch.manual_seed(int(rank) + 10)
        RNGState().save(tmp_path / "rng.ckpt")
        drawn[rank] = torch.rand(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng.ckpt", "rng.rank1.ckpt"]
    for rank in ("1", "0", "2"):
        monkeypatch.setenv("RANK", rank)
        torch.manual_seed(99)
        RNGState().load(tmp_path / "rng.ckpt")
        assert torch.equal(torch.rand(3), drawn["0" if rank == "2" else rank]), rank
