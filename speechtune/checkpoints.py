"""A Checkpointer whose checkpoints appear whole or not at all.

SpeechBrain's ``Checkpointer`` writes a checkpoint's ``CKPT.yaml`` first and its parameter files
after it, and lists every folder that has a ``CKPT.yaml``: a crash or a full disk in the middle
of a save left a checkpoint that looked complete, the newest one, which the next run then tried
to resume from. Here ``CKPT.yaml`` is written under another name and renamed once every file is
saved; a folder without it is a torn save, ignored by every reader and removed by the next save.
A failed save (disk full, folder not writable) stops the run with the folder and the fix, and the
earlier checkpoints stay as they were.

Also here: ``RNGState`` (the random generators, checkpointed) and ``load_state`` (one
recoverable's weights from one checkpoint or averaged over several, for export). What a
checkpoint holds is listed in one place, ``speechtune.brain.FineTuneBrain.checkpoint_contents``.
"""

import logging
import os
import random
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    METAFNAME,
    Checkpointer,
    average_checkpoints,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, get_rank, if_main_process

logger = logging.getLogger(__name__)

PENDING = f"{METAFNAME}.pending"


class AtomicCheckpointer(Checkpointer):
    """SpeechBrain's ``Checkpointer`` with whole-or-nothing saves (same arguments)."""

    def _save_checkpoint_metafile(self, fpath, meta_to_include=None, end_of_epoch=True):
        """The meta file under its pending name (renamed when the save is complete)."""
        return super()._save_checkpoint_metafile(fpath.with_name(PENDING), meta_to_include or {},
                                                 end_of_epoch)

    def save_checkpoint(self, meta=None, end_of_epoch=True, name=None,
                        verbosity=logging.INFO):
        """Save as SpeechBrain does, then publish the checkpoint by renaming its meta file."""
        if if_main_process():
            self.remove_torn()
        try:
            ckpt = super().save_checkpoint(meta=meta or {}, end_of_epoch=end_of_epoch,
                                           name=name, verbosity=verbosity)
        except OSError as err:
            raise OSError(
                f"Could not write a checkpoint in {self.checkpoints_dir} ({err}). Free disk "
                "space there or point --output_folder at a writable disk with room; the "
                "checkpoints saved before are intact (the torn one is ignored), so rerunning "
                "the command resumes from the latest of them.") from err
        # Under DDP every process writes its own files (its RNG state): the main process
        # publishes once all have, and the others go on only once it has. A process that went on
        # earlier listed the checkpoints without the new one, decided on other deletions than
        # the main process, and the two hung in different collectives (seen in CI).
        ddp_barrier()
        if ckpt is not None:  # the main process, once every file is written
            os.replace(ckpt.path / PENDING, ckpt.path / METAFNAME)
        ddp_barrier()
        return ckpt

    def remove_torn(self):
        """Delete checkpoint folders a crash or a failed save left without their meta file."""
        if not self.checkpoints_dir.is_dir():
            return
        for path in self.checkpoints_dir.glob(f"{CKPT_PREFIX}+*"):
            if path.is_dir() and not (path / METAFNAME).exists():
                logger.warning("removing %s: a checkpoint save that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)


@partial(register_checkpoint_hooks, save_on_main_only=False)  # each process saves its own
class RNGState:
    """The random generators' states (Python, NumPy, torch CPU and CUDA), checkpointed so that a
    resumed run draws the masks, dropout and augmentation the uninterrupted one would have.

    Every process of a multi-process run keeps its own: the main process in the checkpoint's
    ``rng.ckpt``, process ``r`` beside it in ``rng.rank<r>.ckpt``. A run resumed with more
    processes than it saved gives the new ones the main process's states.
    """

    @staticmethod
    def capture():
        """The current states."""
        return {"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    @staticmethod
    def rank_path(path):
        """This process's file: ``path`` itself on the main process."""
        path = Path(path)
        rank = get_rank() or 0
        return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")

    @mark_as_saver
    def save(self, path):
        """Write this process's current states."""
        torch.save(self.capture(), self.rank_path(path))

    @mark_as_loader
    def load(self, path, end_of_epoch=True):
        """Set the generators to this process's saved states."""
        del end_of_epoch
        own = self.rank_path(path)
        state = torch.load(own if own.exists() else path, weights_only=False)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def load_state(ckpts, name):
    """The ``name`` recoverable's state dict, averaged over ``ckpts`` when several."""
    if len(ckpts) == 1:
        return torch.load(ckpts[0].paramfiles[name], map_location="cpu")
    return average_checkpoints(ckpts, name,
                               parameter_loader=partial(torch.load, map_location="cpu"))
