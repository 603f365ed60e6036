"""The Whisper family's encoder cache: a frozen encoder's outputs by utterance, so that it runs once
per utterance (``encoder_cache`` in the yaml; ``speechtune.whisper``)."""

import json
import os
from pathlib import Path

import torch


class EncoderCache:
    """Outputs of a frozen Whisper encoder by utterance id, so that the encoder no longer runs
    after the first epoch (and, in validation, after the first validation).

    ``where``: ``memory`` (host RAM: about 2.3 MB per utterance for whisper-small in bf16, 3.1 MB
    for medium) or a folder (one file per utterance, written atomically; DDP processes share it).
    A folder records the model it was filled by and refuses another. Only valid while the encoder
    output depends on nothing but the utterance: frozen encoder, no waveform augmentation (the
    family checks both).
    """

    def __init__(self, where, model_id):
        self.memory = {} if where == "memory" else None
        self.folder = None if where == "memory" else Path(where)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = self.folder / "model.json"
            if stamp.exists() and json.loads(stamp.read_text()) != model_id:
                raise ValueError(
                    f"encoder_cache folder {self.folder} holds outputs of "
                    f"{json.loads(stamp.read_text())}, not of {model_id}: delete it or pass "
                    "another --encoder_cache folder.")
            stamp.write_text(json.dumps(model_id))

    def _path(self, utt_id, dtype):
        return self.folder / str(dtype).removeprefix("torch.") / f"{utt_id}.pt"

    def get(self, ids, dtype, device):
        """The batch's cached outputs on ``device``, or None unless every utterance is cached."""
        if self.memory is not None:
            found = [self.memory.get((i, dtype)) for i in ids]
            if any(t is None for t in found):
                return None
        else:  # read nothing unless the whole batch is there (the first epoch fills it)
            paths = [self._path(i, dtype) for i in ids]
            if not all(p.exists() for p in paths):
                return None
            found = [torch.load(p) for p in paths]
        # copy each to the device and stack there: stacking on the host first costs a
        # batch-sized copy in this (the training) process; the whisper-small step on an H100
        # was 3.3x slower that way (tools/benchmark_results/h100, runs 1 and 2)
        return torch.stack([t.to(device, non_blocking=True) for t in found])

    def put(self, ids, encoded):
        """Store each utterance's output (a (frames, dim) tensor, on the CPU)."""
        for utt_id, out in zip(ids, encoded.cpu(), strict=True):
            if self.memory is not None:
                self.memory[(utt_id, out.dtype)] = out.clone()
                continue
            path = self._path(utt_id, out.dtype)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out.clone(), tmp)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
