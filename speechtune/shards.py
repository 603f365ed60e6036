"""Sharded training audio (WebDataset tar shards): finding them, checking them against the
training manifest, and streaming them as duration-bucketed training batches.

A shard folder (written by ``local/make_shards.py``) holds ``shard-000000.tar``, ... and
``index.json``. Per utterance a shard holds ``<n>.flac`` (mono 16-bit FLAC at the recipe's
rate) and ``<n>.json`` (its manifest row); ``<n>`` is the utterance's row number in the manifest
(IDs may hold dots, which WebDataset reads as an extension). ``index.json`` (written last) is
``{"sample_rate", "manifest", "shards": {name: {"ids", "seconds", "total_seconds"}}}``,
``seconds`` being each utterance's audio length in the shard.

Training from shards (``train_shards``): the training manifest still gives the text (vocabulary,
targets, pre-flight text checks) and the durations; the shards give the audio. An epoch's plan is
computed from the index alone, so every process knows every process's batch count before reading
a byte: the shard order is shuffled with ``(seed, epoch)``, process ``r`` of ``world`` takes
shards ``r::world`` and its loader worker ``w`` of ``W`` takes ``w::W`` of those; each worker
sorts every ``BUFFER_UTTERANCES`` consecutive utterances by duration, cuts them into batches of at
most ``max_batch_seconds`` padded seconds (or ``batch_size``), and shuffles those batches with
``(seed, epoch, rank, worker)``. The epoch length is the largest process's batch count; a
process with fewer repeats its last batch (with shards of equal size, in a number that is a
multiple of the processes, at most one).

Resume rule: a mid-epoch checkpoint records the epoch, the batches consumed in it and a
fingerprint of the epoch's plan (``shards-TRAIN`` in the checkpoint folder). A resumed run skips
exactly those batches (shards holding only consumed utterances are not even opened) and trains
the rest: nothing is trained twice or skipped. With ``num_workers`` > 1 the remaining batches
may come in another order than in the uninterrupted run. A plan that differs (other shards,
process count, ``num_workers``, batching keys) stops the resume with an error.
"""

import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks
from torch.utils.data import DataLoader, IterableDataset

from speechtune import buckets
from speechtune.preflight import Problem

logger = logging.getLogger(__name__)
INDEX = "index.json"
SHARD = "shard-{:06d}.tar"
BUFFER_UTTERANCES = 1000  # utterances sorted together into batches (per loader worker)


# ---------------------------------------------------------------- the index, checks
@dataclass
class Shard:
    path: str
    ids: list
    seconds: list


def find_shards(pattern, sample_rate) -> list[Shard]:
    """The shards a glob or brace pattern names, each with its index entry (``index.json`` in
    its folder); every matched file must be a complete shard at ``sample_rate``."""
    paths = set()
    for part in wds.shardlists.expand_urls(str(pattern)):
        if not any(c in part for c in "*?["):  # a file named (a brace pattern's): must exist
            if not Path(part).is_file():
                raise FileNotFoundError(f"train_shards={pattern!r} names {part}, which does "
                                        "not exist: check the pattern's range and folder")
            paths.add(part)
            continue
        found = Path("/").glob(part[1:]) if Path(part).is_absolute() else Path().glob(part)
        paths.update(str(p) for p in found if p.suffix == ".tar")
    paths = sorted(paths)
    if not paths:
        raise FileNotFoundError(f"train_shards={pattern!r} matches no .tar file: give the shard "
                                "folder's files (e.g. /data/shards/shard-*.tar) made by "
                                "local/make_shards.py")
    indexes, shards, seen = {}, [], {}
    for path in paths:
        folder = Path(path).parent
        if folder not in indexes:
            index = folder / INDEX
            if not index.is_file():
                raise FileNotFoundError(f"{index} is missing: local/make_shards.py writes it "
                                        "last, so the shards there are unfinished; rerun it "
                                        "(it resumes)")
            indexes[folder] = json.loads(index.read_text(encoding="utf-8"))
            if indexes[folder]["sample_rate"] != sample_rate:
                raise ValueError(f"{index}: shards at {indexes[folder]['sample_rate']} Hz, the "
                                 f"recipe's sample_rate is {sample_rate}: make shards with "
                                 f"--sample_rate={sample_rate}")
        entry = indexes[folder]["shards"].get(Path(path).name)
        if entry is None:
            raise ValueError(f"{path} is not in {folder / INDEX}: not a complete shard of that "
                             "folder; rerun local/make_shards.py there or leave it out of "
                             "train_shards")
        for utt in entry["ids"]:
            if utt in seen:
                raise ValueError(f"utterance {utt!r} is in {seen[utt]} and {path}: "
                                 "train_shards must not match two shard sets of one corpus")
            seen[utt] = path
        shards.append(Shard(path, entry["ids"], entry["seconds"]))
    return shards


def from_hparams(hparams):
    """The ``train_shards`` of a loaded yaml (None: train from the manifest's audio files)."""
    if not hparams["train_shards"]:
        return None
    if hparams["corpora"]:
        raise ValueError("corpora mixes corpora by weight from their manifests; train_shards "
                         "streams one shard set: set one of them (train_shards: null, or "
                         "corpora: {})")
    if hparams["replay_fraction"]:
        raise ValueError("replay_fraction > 0 draws training rows from the retain sets' replay "
                         "manifests, which are not in train_shards: set train_shards: null to "
                         "replay, or replay_fraction: 0")
    return find_shards(hparams["train_shards"], hparams["sample_rate"])


def check(shards, rows, duration_tolerance=0.1):
    """Pre-flight problems of training ``rows`` against the shard index: not in any shard
    (``not_in_shards``), or a manifest duration that differs from the shard's audio."""
    seconds = {utt: s for shard in shards for utt, s in zip(shard.ids, shard.seconds,
                                                            strict=True)}
    logger.info("pre-flight with train_shards: the training rows are checked against the "
                "index of %d shard(s) (present, duration); their audio is not decoded for "
                "level, clipping, tone or leakage by content", len(shards))
    problems = []
    for row in rows:
        actual = seconds.get(row["ID"])
        if actual is None:
            problems.append(Problem("train", row["ID"], "not_in_shards",
                                    f"not in the {len(shards)} shard(s) of train_shards"))
        elif abs(row["duration"] - actual) > max(duration_tolerance, 0.02 * actual):
            problems.append(Problem("train", row["ID"], "duration_mismatch",
                                    f"manifest {row['duration']:.3f} s, shard audio "
                                    f"{actual:.3f} s"))
    return problems


# ---------------------------------------------------------------- the epoch plan
def cut_batches(window, max_seconds, max_utterances, batch_size, bucket_ratio=None):
    """``window`` (``(id, seconds)`` sorted by seconds) cut into batches: at most
    ``max_seconds`` padded seconds (with ``bucket_ratio``, at the batch's bucket length,
    ``speechtune.buckets``) and ``max_utterances`` each, or ``batch_size`` each when
    ``max_seconds`` is None."""
    if max_seconds is None:
        return [[u for u, _ in window[k:k + batch_size]] for k in range(0, len(window),
                                                                        batch_size)]
    batches, current = [], []
    for utt, seconds in window:
        padded = buckets.bucket_seconds(seconds, bucket_ratio) if bucket_ratio else seconds
        if current and ((len(current) + 1) * padded > max_seconds
                        or (max_utterances and len(current) + 1 > max_utterances)):
            batches.append(current)
            current = []
        current.append(utt)
    return batches + [current] if current else batches


def plan_epoch(shards, durations, epoch, seed, world, workers, batching,
               buffer=BUFFER_UTTERANCES):
    """``[rank][worker] -> (shards, batches)`` of an epoch (module docstring); ``durations``:
    ``{id: seconds}`` of the utterances to train (others in the shards are left out);
    ``batching``: ``cut_batches``' keyword arguments."""
    order = list(range(len(shards)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    plans = []
    for rank in range(world):
        mine = order[rank::world]
        plans.append([])
        for worker in range(workers):
            picked = [shards[k] for k in mine[worker::workers]]
            rng = random.Random(f"{seed}:{epoch}:{rank}:{worker}")
            items = [(u, durations[u]) for s in picked for u in s.ids if u in durations]
            batches = []
            for start in range(0, len(items), buffer):
                window = sorted(items[start:start + buffer], key=lambda item: item[1])
                cut = cut_batches(window, **batching)
                rng.shuffle(cut)
                batches += cut
            plans[rank].append((picked, batches))
    return plans


def interleaved(counts):
    """The worker of each batch, in the order a DataLoader yields them (round robin over the
    workers that still have batches)."""
    return [w for i in range(max(counts, default=0)) for w, n in enumerate(counts) if i < n]


# ---------------------------------------------------------------- streaming
class ShardStream(IterableDataset):
    """Batches (``PaddedBatch``) of one process's planned work; in a loader worker, its part.
    Each utterance goes through ``dataset``'s pipeline (the family's), its ``wav`` being the
    FLAC bytes from the shard."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.work, self.skips = [], []  # set per epoch by ShardLoader

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        shards, batches = self.work[worker]
        position = self.skips[worker]
        needed = {u for batch in batches[position:] for u in batch}
        files = [s.path for s in shards if needed.intersection(s.ids)]
        pending, pipeline = {}, wds.DataPipeline(wds.SimpleShardList(files),
                                                 wds.tarfile_to_samples()) if files else ()
        for sample in pipeline:
            utt = json.loads(sample["json"])["ID"]
            if utt in needed:
                pending[utt] = sample["flac"]
            while position < len(batches) and all(u in pending for u in batches[position]):
                yield self.collate([(u, pending.pop(u)) for u in batches[position]])
                position += 1
        if position < len(batches):
            lacking = [u for u in batches[position] if u not in pending]
            raise RuntimeError(f"the shards {files} lack {lacking[:3]}, which their index.json "
                               "lists: the shards changed after it was written; rerun "
                               "local/make_shards.py on that folder")

    def collate(self, items):
        """The dataset's outputs (``sig`` decoded from the FLAC bytes) as one padded batch."""
        data_, pipeline = self.dataset.data, self.dataset.pipeline
        return PaddedBatch([pipeline.compute_outputs({"id": u, **data_[u],
                                                      "wav": io.BytesIO(flac)})
                            for u, flac in items])


def _as_is(batch):
    return batch


@register_checkpoint_hooks
class ShardLoader(DataLoader):
    """The training loader over shards: this process's batches of the current epoch (the
    ``epoch_counter``'s value when iteration starts), padded to the epoch length every process
    shares, resumable mid-epoch (module docstring)."""

    def __init__(self, shards, dataset, epoch_counter, seed, batching, num_workers=0, rank=0,
                 world=1, buffer=BUFFER_UTTERANCES):
        super().__init__(ShardStream(dataset), batch_size=None, num_workers=num_workers,
                         collate_fn=_as_is)
        if len(shards) < world:
            raise ValueError(f"train_shards has {len(shards)} shard(s) for {world} processes: "
                             "each process reads its own shards; make smaller ones "
                             "(local/make_shards.py --shard_mb) so there are at least as many "
                             "as processes, best a multiple of them")
        self.shards, self.epoch_counter, self.rank, self.world = shards, epoch_counter, rank, world
        self.durations = {u: float(r["duration"]) for u, r in dataset.data.items()}
        self.seed, self.batching, self.buffer = seed, batching, buffer
        self.epoch, self.consumed, self.resume = None, 0, None
        self._plans = self._digest = (None, None)  # (epoch, its plans / their digest)

    def plans(self, epoch=None):
        """An epoch's plan of every process (``plan_epoch``); default the current epoch."""
        epoch = int(self.epoch_counter.current) if epoch is None else epoch
        if self._plans[0] != epoch:
            self._plans = (epoch, plan_epoch(self.shards, self.durations, epoch, self.seed,
                                             self.world, max(1, self.num_workers),
                                             self.batching, self.buffer))
        return self._plans[1]

    def fingerprint(self, epoch):
        """A digest of ``epoch``'s plan: a resume must find the same one."""
        if self._digest[0] != epoch:
            plans = [[([s.path for s in shards], batches) for shards, batches in per]
                     for per in self.plans(epoch)]
            self._digest = (epoch, hashlib.sha1(json.dumps(plans).encode()).hexdigest())
        return self._digest[1]

    def __len__(self):
        return max(sum(len(b) for _, b in per) for per in self.plans())

    def __iter__(self):
        own, length = self.plans()[self.rank], len(self)
        epoch, start = int(self.epoch_counter.current), 0
        if self.resume is not None:
            saved, self.resume = self.resume, None
            if saved["epoch"] == epoch:
                if saved["fingerprint"] != self.fingerprint(epoch):
                    raise ValueError(
                        f"the checkpoint stopped epoch {epoch} after {saved['consumed']} batches "
                        "of another epoch plan than this run's (other train_shards, processes, "
                        "num_workers or batching keys): resume with the same ones, or delete "
                        "that mid-epoch checkpoint")
                start = saved["consumed"]
        counts = [len(b) for _, b in own]
        first = min(start, sum(counts) - 1) if sum(counts) else 0
        order = interleaved(counts)[:first]
        self.dataset.work = own
        self.dataset.skips = [order.count(w) for w in range(len(own))]
        if length > sum(counts):
            logger.info("process %d: %d batches in its shards, its last one repeated %d time(s) "
                        "to the %d every process steps", self.rank, sum(counts),
                        length - sum(counts), length)
        self.epoch, self.consumed, batch, position = epoch, start, None, first
        for batch in super().__iter__():
            position += 1
            if position > start:
                self.consumed += 1
                yield batch
        if batch is None and self.consumed < length:
            raise RuntimeError(f"process {self.rank} has no training batch in epoch {epoch}")
        while self.consumed < length:
            self.consumed += 1
            yield batch

    @mark_as_saver
    def save_position(self, path):
        state = {"epoch": self.epoch, "consumed": self.consumed,
                 "fingerprint": self.fingerprint(self.epoch) if self.epoch is not None else None}
        Path(path).write_text(json.dumps(state), encoding="utf-8")

    @mark_as_loader
    def load_position(self, path, end_of_epoch):
        state = json.loads(Path(path).read_text(encoding="utf-8"))
        self.resume = None if end_of_epoch or state["epoch"] is None else state


def train_loader(hparams, dataset, shards, checkpointer):
    """The ``ShardLoader`` of a recipe (``dataset``: the training rows with the family's
    pipelines), registered with ``checkpointer`` as ``shards-TRAIN``."""
    dist = torch.distributed
    on = dist.is_available() and dist.is_initialized()
    batching = {"max_seconds": hparams["max_batch_seconds"] if hparams["dynamic_batching"]
                else None, "max_utterances": hparams["max_batch_utterances"],
                "batch_size": hparams["batch_size"], "bucket_ratio": hparams.get("bucket_ratio")}
    loader = ShardLoader(shards, dataset, hparams["epoch_counter"], hparams["seed"], batching,
                         hparams["num_workers"], dist.get_rank() if on else 0,
                         dist.get_world_size() if on else 1)
    if checkpointer is not None:
        checkpointer.add_recoverable("shards-TRAIN", loader, optional_load=True)
    return loader
