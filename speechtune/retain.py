"""The forgetting guardrail: what the base model must keep doing while it learns the target.

A recipe may name retain sets, manifests (the manifest contract) of speech the model must still
transcribe after fine-tuning, each in its own language (English while fine-tuning Danish)::

    retain:
        en: {manifest: ../data/en/valid.csv, language: en}
    retain_max_utterances: 60   # the first N rows of each (greedy decoding at every validation)
    retain_max_rise: 10.0       # WER points a checkpoint may lose on them to be tested; null: off

A retain set may also name a ``replay`` manifest (other speech in its language): with
``replay_fraction: f`` a seeded sample of it, ``f`` of the training utterances, trains beside the
target data, each utterance normalised, checked and (for Whisper) prefixed in its own language
(``replay_rows``).

The sets go through the recipe's text normalisation (their language's) and pre-flight checks
like a test set (problems stop the run; leakage from train is reported). Before training, the
model as loaded is scored on them once (``retain_base.json``, kept for a resumed run); every
validation scores them again with the valid split's greedy decoding, after the set's language
token for Whisper. The train log shows ``WER_retain_<name>`` beside the valid WER, the curves
plot them, and each checkpoint records ``retain_rise``: the largest rise in WER points over the
base model across the sets.

With ``retain_max_rise: X`` the test loads the checkpoint of lowest valid WER among those whose
``retain_rise`` is at most X (kept beside the best-WER one); when none qualifies, the
best-WER checkpoint is tested and the log and the test line say so.
"""

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import speechbrain as sb

from speechtune import data

logger = logging.getLogger(__name__)
PREFIX = "retain_"  # split names of the retain sets: retain_<name>


def read_retain_sets(hparams):
    """``({split: {id: row}}, {split: language})`` of the yaml's ``retain`` sets: the first
    ``retain_max_utterances`` rows of each manifest, ``$data_root`` as ``data_folder``."""
    sets = hparams["retain"] or {}
    rows, languages = {}, {}
    for name, spec in sets.items():
        if not isinstance(spec, dict) or not {"manifest", "language"} <= set(spec) or \
                not set(spec) <= {"manifest", "language", "replay"}:
            raise ValueError(f"retain.{name}: give {{manifest: <CSV>, language: <code>}} and "
                             f"optionally replay: <CSV>, got {spec!r}")
        split = PREFIX + str(name)
        manifest = data.read_manifest(spec["manifest"], hparams["data_folder"])
        limit = hparams["retain_max_utterances"]
        rows[split] = dict(list(manifest.items())[:limit]) if limit else manifest
        languages[split] = str(spec["language"])
    if hparams["retain_max_rise"] is not None and not sets:
        raise ValueError("retain_max_rise selects checkpoints by their retain WER, but no "
                         "retain set is given: add `retain: {name: {manifest: ..., language: "
                         "...}}` or set retain_max_rise: null")
    if hparams["retain_max_rise"] is not None and int(hparams["average_best"]) > 1:
        raise ValueError("retain_max_rise picks one checkpoint; average_best > 1 averages the "
                         "best by valid WER alone: use one of them")
    return rows, languages


def replay_rows(hparams, train):
    """Training rows drawn from the retain sets' ``replay`` manifests (speech in their language,
    other than the scored ``manifest``): ``replay_fraction`` of the training utterances, e.g.
    0.2 adds a quarter as many as ``train`` holds, a seeded sample drawn once (the same on a
    resumed run), each row's ``utt_language`` its set's language. ``{}`` when off."""
    fraction, sets = hparams["replay_fraction"], hparams["retain"] or {}
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay_fraction={fraction}: a share of the training utterances, "
                         "at least 0 and below 1")
    if not fraction:
        return {}
    pool = [row | {"utt_language": str(spec["language"])} for spec in sets.values()
            if spec.get("replay") for row in
            data.read_manifest(spec["replay"], hparams["data_folder"]).values()]
    if not pool:
        raise ValueError(f"replay_fraction={fraction}, but no retain set names a replay "
                         "manifest: add replay: <CSV> to one (speech in its language that is "
                         "not the scored manifest)")
    wanted = round(fraction / (1.0 - fraction) * len(train))
    if wanted > len(pool):
        logger.warning("replay_fraction=%g asks for %d replay utterances; the replay manifests "
                       "hold %d: all are used", fraction, wanted, len(pool))
    drawn = random.Random(hparams["seed"]).sample(pool, min(wanted, len(pool)))
    clash = sorted({r["ID"] for r in drawn} & set(train))
    if clash:
        raise ValueError(f"replay utterance ID(s) {clash[:3]} are also training IDs: make the "
                         "replay manifest's IDs distinct")
    logger.info("replay: %d utterances of the retain sets' replay manifests join the %d "
                "training utterances (replay_fraction=%g)", len(drawn), len(train), fraction)
    return {r["ID"]: r for r in drawn}


@dataclass
class RetainGuard:
    """The retain sets' loaders, the base model's WER on them and the selection limit."""

    loaders: dict  # split -> DataLoader
    max_rise: float | None = None
    base: dict = field(default_factory=dict)  # split -> WER of the model as loaded
    chosen: object = None  # the checkpoint ``recover`` selected (None: none qualified)

    def score(self, brain):
        """``{split: WER}`` of the modules as they are, greedy as in validation."""
        scores = {}
        was_training = brain.modules.training
        for split, loader in self.loaders.items():
            brain.scoring_split = split
            brain.score_loader(loader)
            scores[split] = float(brain.wer_metric.summarize("error_rate"))
        brain.scoring_split = "valid"
        brain.modules.train(was_training)
        return scores

    def on_validation(self, brain, stats, meta):
        """After a validation: score the sets, add ``WER_<split>`` to the logged ``stats`` and
        ``retain_rise`` to the checkpoint's ``meta``, record them in the history; returns the
        checkpointer's extra importance keys."""
        scores = self.score(brain)
        stats.update({f"WER_{s}": w for s, w in scores.items()})
        brain.hparams.history.add_retain(meta["step"], scores)
        meta.update({f"WER_{s}": w for s, w in scores.items()}, retain_rise=self.rise(scores))
        return [self.importance] if self.max_rise is not None else []

    def recover(self, brain, min_key):
        """Load the checkpoint ``select_checkpoint`` picks into ``brain`` (the best-WER one if
        none qualifies)."""
        brain.averaged_from = None
        self.chosen = select_checkpoint(brain.checkpointer, self)
        brain.checkpointer.recover_if_possible(
            min_key=min_key, ckpt_predicate=self.qualifies if self.chosen else None)

    def summary(self, checkpointer):
        """Lines for the end of a run: which checkpoint was tested, and per retain set the base
        model's WER against that checkpoint's."""
        tested = checkpointer.find_checkpoint(
            min_key="WER", ckpt_predicate=self.qualifies if self.chosen else None)
        if self.max_rise is None:
            which = "the best-WER checkpoint (retain_max_rise: null, no selection by them)"
        elif self.chosen is not None:
            which = (f"the best-WER checkpoint whose retain WER rose by at most "
                     f"{self.max_rise:g} points")
        else:
            which = (f"the best-WER checkpoint: NONE rose by at most {self.max_rise:g} points "
                     "on the retain sets")
        lines = [f"retain sets, tested {which}:"]
        for split, base in self.base.items():
            now = tested.meta.get(f"WER_{split}") if tested is not None else None
            lines.append(f"  {split}: WER {base:.2f}% as loaded -> " + (
                f"{now:.2f}% ({now - base:+.2f} points)" if now is not None else "not scored"))
        return lines

    def rise(self, scores):
        """The largest WER rise in points over the base model across the sets."""
        return max(scores[s] - self.base[s] for s in scores)

    def qualifies(self, checkpoint):
        """A checkpoint whose retain WER rose by at most ``max_rise`` points."""
        return checkpoint.meta.get("retain_rise", math.inf) <= self.max_rise

    def importance(self, checkpoint):
        """Keep the best qualifying checkpoint (lowest valid WER) beside the best overall."""
        return -checkpoint.meta["WER"] if self.qualifies(checkpoint) else -math.inf


def base_scores(brain, guard, output_folder):
    """The model as loaded on the retain sets, once: ``retain_base.json`` keeps it for a
    resumed run (its modules then hold trained weights)."""
    path = Path(output_folder) / "retain_base.json"
    if sb.utils.distributed.ddp_broadcast(path.is_file()):
        saved = json.loads(path.read_text(encoding="utf-8"))
        if set(saved) != set(guard.loaders):  # the yaml's sets changed since the run began
            raise ValueError(f"{path} holds the base model's WER on {sorted(saved)}, but the "
                             f"yaml's retain sets are {sorted(guard.loaders)}: the model as "
                             "loaded is gone once training started. Use another "
                             "--output_folder for other retain sets.")
        return saved
    scores = guard.score(brain)
    if sb.utils.distributed.if_main_process():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(scores, indent=1), encoding="utf-8")
        tmp.replace(path)
    logger.info("retain sets, the model as loaded: %s",
                ", ".join(f"{s} WER {w:.2f}%" for s, w in scores.items()))
    return scores


def select_checkpoint(checkpointer, guard):
    """The checkpoint to test under ``retain_max_rise``: the lowest valid WER among those that
    qualify; None (test the best-WER one) with a loud warning when none does."""
    chosen = checkpointer.find_checkpoint(min_key="WER", ckpt_predicate=guard.qualifies)
    if chosen is None:
        rises = sorted(c.meta["retain_rise"] for c in checkpointer.list_checkpoints()
                       if "retain_rise" in c.meta)
        logger.warning(
            "!!! NO CHECKPOINT KEPT THE RETAIN SETS: every kept checkpoint's retain WER rose by "
            "more than retain_max_rise=%g points (the smallest rise: %s). Testing the best-WER "
            "checkpoint instead, which forgot more than allowed. Lower the LR, train fewer "
            "steps, or raise retain_max_rise.", guard.max_rise,
            f"{rises[0]:.1f}" if rises else "none recorded")
    return chosen
