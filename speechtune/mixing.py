"""Training on several corpora at once, each drawn with a sampling weight.

A recipe yaml names the corpora (``corpora``; ``{}``: one corpus, the recipe's own preparation)::

    corpora:
        coral: {prepare: coral, weight: 0.7, data_folder: /data/coral,
                manifest_folder: ../prepared/coral_read_aloud}
        cv_da: {prepare: commonvoice, weight: 0.3, data_folder: /data/cv/da,
                manifest_folder: ../prepared/commonvoice_da}
    mix_epoch_utterances: null   # utterances drawn per epoch; null: all corpora's together

Each corpus is prepared by the recipe's preparation function (``prepare``: its name when the
recipe's train.py passes several, ``{name: prepare(hparams)}``), called with the run's hparams
where the corpus's other keys replace the run's (``data_folder``, ``manifest_folder``,
``language``, ...: any key the yaml has). ``preparation`` merges their manifests into
``<output_folder>/mixture/``:

- every utterance ID becomes ``<corpus>-<ID>`` (corpus names are letters, digits and ``_``, so
  two corpora's IDs never clash), each row gets a ``corpus`` column (a group column: per-corpus
  tables wherever corpora share a split) and ``utt_language`` (its corpus's ``language``: text
  normalisation and Whisper's language token per utterance);
- ``train.csv``: every corpus's train split; training draws from it by weight (below);
- ``valid.csv``: every corpus's valid split pooled. Its WER (all valid words of all corpora) picks
  the checkpoints, as for one corpus: the checkpointer, ``average_best``, the retain guard and the
  tools keep reading one ``WER``, and each corpus counts by its valid split's words, a share the
  user sets by the valid splits' sizes. A weighted mean of per-corpus WERs would hide in the
  selection a second set of weights the log does not show;
- ``<split>_<corpus>.csv``: each corpus's test split(s) apart (``test_coral``, ``test_cv_da``),
  scored in its language: the test report gives one WER line and ``wer_<split>_<corpus>.txt``
  per corpus.

Sampling (``MixtureBatchSampler``): an epoch draws ``mix_epoch_utterances`` utterances (N); each
draw picks corpus c with probability weight_c / sum of weights (weights are relative), then that
corpus's next utterance in a random order of its train split, reshuffled when used up (an
upweighted small corpus repeats; within an epoch no utterance repeats before all of its corpus
have been drawn). The generator is seeded by ``(seed, epoch)``: reproducible, a resumed run draws
the same epoch, each epoch draws anew. The drawn utterances are batched like one corpus:
duration-budget batches (SpeechBrain's ``DynamicBatchSampler`` over them) or ``batch_size`` in
draw order. The number of batches per epoch is fixed at that of epoch 0 (DDP's sampler wrapper
splits a fixed number of batches across processes): an epoch whose draw makes more batches keeps
the first ones of its shuffled batches (every utterance equally likely dropped), one that makes
fewer draws N more and adds their batches.
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from speechbrain.dataio.sampler import DynamicBatchSampler

from speechtune import data

logger = logging.getLogger(__name__)
OWN_KEYS = ("prepare", "weight")  # a corpus's keys that are not the run's hparams keys
NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class Corpus:
    """One corpus of the mixture: its relative weight, preparation and hparams view."""

    name: str
    weight: float
    prepare: object  # prepare(hparams) -> data.Manifests
    hparams: dict  # the run's hparams with the corpus's own keys in place

    @property
    def language(self):
        return str(self.hparams["language"])


def corpora(hparams, prepare):
    """The yaml's ``corpora`` checked: ``[Corpus]`` in yaml order. ``prepare``: the recipe's
    preparation function, or ``{name: function}`` when the recipe has several."""
    specs = hparams["corpora"]
    if not isinstance(specs, dict) or not specs:
        raise ValueError(f"corpora: {specs!r}; give {{name: {{weight: <number>, ...}}}} with one "
                         "entry per corpus to mix")
    if hparams["replay_fraction"]:
        raise ValueError("corpora and replay_fraction both add training speech: give the replay "
                         "speech its own corpus entry (with its language and weight) and set "
                         "replay_fraction: 0")
    named = prepare if isinstance(prepare, dict) else None
    found = []
    for name, spec in specs.items():
        where = f"corpora.{name}"
        if not NAME.fullmatch(str(name)):
            raise ValueError(f"{where}: a corpus name is letters, digits and _ (it prefixes the "
                             "utterance IDs and names the test splits); rename it")
        if not isinstance(spec, dict) or "weight" not in spec:
            raise ValueError(f"{where}: {spec!r}; give a mapping with at least weight: "
                             "<positive number>")
        weight = spec["weight"]
        if isinstance(weight, bool) or not isinstance(weight, int | float) or \
                not 0 < weight < float("inf"):
            raise ValueError(f"{where}.weight: {weight!r} is not a positive number; weights are "
                             "relative sampling shares (0.7 and 0.3, or 7 and 3); to leave a "
                             "corpus out, remove its entry")
        unknown = sorted(set(spec) - set(OWN_KEYS) - set(hparams))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}. A corpus takes weight, prepare "
                             "(with several preparations) and any key of the run's yaml that its "
                             "preparation reads (data_folder, manifest_folder, language, ...)")
        if named is None:
            if "prepare" in spec:
                raise ValueError(f"{where}.prepare: this recipe has one preparation; remove the "
                                 "key")
            function = prepare
        elif spec.get("prepare") not in named:
            raise ValueError(f"{where}.prepare: {spec.get('prepare')!r}; this recipe prepares "
                             f"{sorted(named)}: name one of them")
        else:
            function = named[spec["prepare"]]
        own = {k: v for k, v in spec.items() if k not in OWN_KEYS}
        found.append(Corpus(str(name), float(weight), function, {**hparams, **own}))
    return found


def preparation(hparams, prepare):
    """The run's preparation: ``prepare`` itself without ``corpora``, else one that prepares
    every corpus and writes the merged manifests (module docstring)."""
    if not hparams["corpora"]:
        if isinstance(prepare, dict):
            raise ValueError(f"this recipe mixes corpora ({sorted(prepare)}): name them in the "
                             "yaml's corpora: {name: {prepare: ..., weight: ..., data_folder: "
                             "...}}")
        return prepare
    mixed = corpora(hparams, prepare)
    return lambda run_hparams: merge(run_hparams, mixed)


def merge(hparams, mixed):
    """Prepare each corpus and write ``<output_folder>/mixture/``: ``train.csv``,
    ``valid.csv`` and ``<split>_<corpus>.csv`` per test split; returns their ``Manifests``."""
    folder = Path(hparams["output_folder"]) / "mixture"
    splits = {"train": [], "valid": []}
    tests, languages = {}, {}
    for corpus in mixed:
        manifests = corpus.prepare(corpus.hparams)
        own = {"train": manifests.train, "valid": manifests.valid, **manifests.tests}
        for split, path in own.items():
            rows = _rows(corpus, path)
            if split == "train" and not rows:
                raise ValueError(f"corpora.{corpus.name}: its train split ({path}) holds no "
                                 "utterances; prepare it again (check its data_folder) or remove "
                                 "the corpus from corpora")
            if split in splits:
                splits[split].extend(rows)
            else:
                name = f"{split}_{corpus.name}"
                tests[name] = rows
                languages[name] = manifests.languages.get(split, corpus.language)
    paths = {split: _write(folder / f"{split}.csv", rows)
             for split, rows in {**splits, **tests}.items()}
    return data.Manifests(train=paths.pop("train"), valid=paths.pop("valid"), tests=paths,
                          languages=languages)


def _rows(corpus, path):
    """A corpus's manifest rows, IDs prefixed, ``$data_root`` resolved, ``corpus`` and
    ``utt_language`` set (a row's own ``utt_language`` kept)."""
    rows = data.read_manifest(path, corpus.hparams["data_folder"])
    return [{**row, "ID": f"{corpus.name}-{utt}", "corpus": corpus.name,
             "utt_language": row.get("utt_language") or corpus.language}
            for utt, row in rows.items()]


def _write(path, rows):
    """Write a merged manifest unless the file already holds exactly it (the preparation runs
    on the main process, then again on every process to find the manifests)."""
    header = list(data.REQUIRED_COLUMNS) + sorted({c for r in rows for c in r}
                                                  - set(data.REQUIRED_COLUMNS))
    return str(data.write_manifest(path, rows, header, only_if_changed=True))


class MixtureBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices drawn by corpus weight, a fixed number per epoch (module
    docstring). ``corpus_of``: each dataset index's corpus; ``durations``: its seconds;
    ``weights``: ``{corpus: relative weight}``; ``max_batch_seconds`` set: duration-budget
    batches (``num_buckets`` or ``bucket_ratio``, ``max_batch_ex``), else ``batch_size`` per
    batch."""

    def __init__(self, corpus_of, durations, weights, epoch_utterances, seed, batch_size=None,
                 max_batch_seconds=None, num_buckets=None, max_batch_ex=None,
                 bucket_ratio=None):
        self.names = list(weights)
        total = sum(weights.values())
        self.probabilities = np.array([weights[n] / total for n in self.names])
        self.members = [np.flatnonzero(np.asarray(corpus_of) == n) for n in self.names]
        empty = [n for n, m in zip(self.names, self.members, strict=True) if not len(m)]
        if empty:
            raise ValueError(f"corpora {empty}: no training utterance left (all outside "
                             "min_duration/max_duration, or dropped by the pre-flight checks); "
                             "widen the limits or remove the corpus from corpora")
        if isinstance(epoch_utterances, bool) or not isinstance(epoch_utterances, int) or \
                epoch_utterances < 1:
            raise ValueError(f"mix_epoch_utterances: {epoch_utterances!r}; a positive number "
                             "of utterances per epoch, or null (all corpora's together)")
        self.durations = [float(d) for d in durations]
        self.epoch_utterances, self.seed = epoch_utterances, int(seed)
        self.batch_size, self.max_batch_seconds = batch_size, max_batch_seconds
        self.num_buckets, self.max_batch_ex = num_buckets, max_batch_ex
        self.bucket_ratio = bucket_ratio
        self.epoch, self.length = 0, None
        self.batches = self._epoch_batches(0)
        self.length = len(self.batches)

    def draw(self, rng):
        """``epoch_utterances`` dataset indices: a corpus per draw by weight, then the next of
        that corpus's utterances in a random order (reshuffled when used up)."""
        which = rng.choice(len(self.names), size=self.epoch_utterances, p=self.probabilities)
        order = np.empty(self.epoch_utterances, dtype=np.int64)
        for c, members in enumerate(self.members):
            picked = which == c
            wanted = int(picked.sum())
            rounds = -(-wanted // len(members))
            order[picked] = np.concatenate([rng.permutation(members)
                                            for _ in range(rounds)] or [members[:0]])[:wanted]
        return order.tolist()

    def _batch(self, indices, seed):
        if self.max_batch_seconds is None:
            return [indices[i:i + self.batch_size]
                    for i in range(0, len(indices), self.batch_size)]
        lengths = [self.durations[i] for i in indices]
        sampler = DynamicBatchSampler(
            indices, max_batch_length=self.max_batch_seconds,
            **data.bucketing(lengths, self.num_buckets, self.bucket_ratio),
            lengths_list=lengths, shuffle=True,
            batch_ordering="random", max_batch_ex=self.max_batch_ex, seed=seed)
        return [[indices[position] for position in batch] for batch in sampler]

    def _epoch_batches(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        while len(batches) < (self.length or 1):  # epoch 0 sets the length: one draw
            batches += self._batch(self.draw(rng), int(rng.integers(2**31)))
        return batches[:self.length] if self.length else batches

    def epoch_draws(self):
        """The dataset indices this epoch's batches hold (in batch order)."""
        return [i for batch in self.batches for i in batch]

    def set_epoch(self, epoch):
        """Draw epoch ``epoch``'s batches (SpeechBrain calls it before each epoch)."""
        self.epoch = epoch
        self.batches = self._epoch_batches(epoch)

    def __iter__(self):
        return iter([list(batch) for batch in self.batches])

    def __len__(self):
        return self.length


def batch_sampler(dataset, hparams):
    """The training batch sampler of a mixture run over ``dataset`` (a ``DynamicItemDataset`` of
    the merged train rows), with the yaml's weights and batching keys."""
    rows = [dataset.data[i] for i in dataset.data_ids]
    if any("corpus" not in r for r in rows):
        raise ValueError("corpora is set, but the training rows have no corpus column: this "
                         "recipe's preparation ran without the mixture (run it through "
                         "speechtune.recipe.run)")
    weights = {str(name): float(spec["weight"]) for name, spec in hparams["corpora"].items()}
    size = hparams["mix_epoch_utterances"]
    sampler = MixtureBatchSampler(
        [r["corpus"] for r in rows], [r["duration"] for r in rows], weights,
        len(rows) if size is None else size, hparams["seed"], batch_size=hparams["batch_size"],
        max_batch_seconds=hparams["max_batch_seconds"] if hparams["dynamic_batching"] else None,
        num_buckets=hparams["num_buckets"], max_batch_ex=hparams["max_batch_utterances"],
        bucket_ratio=hparams.get("bucket_ratio"))
    counts = {n: len(m) for n, m in zip(sampler.names, sampler.members, strict=True)}
    logger.info("mixture: %d utterances drawn per epoch in %d batches from %s", sampler
                .epoch_utterances, len(sampler), ", ".join(
                    f"{n} (weight {weights[n]:g}, {counts[n]} training utterances)"
                    for n in sampler.names))
    return sampler

