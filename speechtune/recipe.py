"""The shared recipe runner: hparams -> manifests -> the family's setup (with the pre-flight
checks) -> fit -> test -> results.

A recipe's ``train.py`` only supplies its corpus preparation (``prepare(hparams) -> Manifests``);
everything else, identical for every corpus, lives here. ``load_hparams`` is the one hparams
loader of every entry point (train.py, tune_lm.py, tools): it composes the recipe yaml with its
``defaults`` base, checks the command line, and loads the yaml, which builds no model.
"""

import dataclasses
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import ruamel.yaml
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml, resolve_references
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process, run_on_main

from speechtune import data, families, gate, mixing, shards
from speechtune.brain import FineTuneBrain
from speechtune.corpus_checks import (
    DegenerateLimits,
    all_outside_message,
    cache_path,
    collect_stats,
    outside_limits,
)
from speechtune.preflight import PreflightError, Problem, apply_event_tags, run_preflight
from speechtune.prepare.custom import RESERVED
from speechtune.retain import RetainGuard, base_scores, read_retain_sets, replay_rows
from speechtune.text import EventTags


def compose(hparams_file):
    """The recipe yaml on top of its ``defaults`` (a base yaml, path relative to the recipe's):
    the base's top-level keys, each replaced whole by the recipe's where it sets one, then the
    recipe's own keys. ``!include:`` paths are made absolute (each relative to the file that
    names it). Returns the composed document (ruamel round-trip), nothing constructed."""
    path = Path(hparams_file).resolve()
    rt = ruamel.yaml.YAML(typ="rt")
    with open(path, encoding="utf-8") as f:
        doc = rt.load(f)
    if doc is None:
        raise ValueError(f"{hparams_file} is empty")
    _absolute_includes(doc, path.parent)
    base_name = doc.pop("defaults", None)
    if base_name is None:
        return doc
    base_path = path.parent / str(base_name)
    if not base_path.is_file():
        raise FileNotFoundError(f"{hparams_file}: defaults {base_name} ({base_path}) does not "
                                "exist; give the path of the family's base yaml relative to this "
                                "file (hparams/ctc.yaml or hparams/whisper.yaml at the top)")
    composed = compose(base_path)
    for key, value in doc.items():
        composed[key] = value
    # hyperpyyaml resolves an !include where it meets it, so a reference into one
    # (``!ref <augmentation[speeds]>``) must come after it: included blocks go first, right
    # after the seed is set (what they build is then built after seeding, as before)
    included = [k for k, v in composed.items() if _include_tag(v)]
    first = list(composed).index("__set_seed") + 1 if "__set_seed" in composed else 0
    for offset, key in enumerate(included):
        composed.insert(first + offset, key, composed.pop(key))
    return composed


def _include_tag(node):
    value = getattr(getattr(node, "tag", None), "value", None) or ""
    return value.startswith("!include:")


def _absolute_includes(node, folder):
    value = getattr(getattr(node, "tag", None), "value", None) or ""
    if _include_tag(node) and not Path(value[len("!include:"):]).is_absolute():
        node.yaml_set_ctag(ruamel.yaml.tag.Tag(
            suffix="!include:" + str((folder / value[len("!include:"):]).resolve())))
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        _absolute_includes(child, folder)


def resolve(hparams_file, overrides=None):
    """``hparams_file`` composed with its defaults (``compose``), ``overrides`` (a dict or a yaml
    string; a key the yaml lacks is an error) applied and references resolved: yaml text,
    nothing constructed yet."""
    text = StringIO()
    ruamel.yaml.YAML(typ="rt").dump(compose(hparams_file), text)
    text.seek(0)
    return resolve_references(text, overrides, overrides_must_match=True).getvalue()


def load_yaml(hparams_file, overrides=None):
    """The loaded yaml (``resolve``, then the objects it declares; no model) without a command
    line or an output folder: for tests and tools that build experiments in-process."""
    return load_hyperpyyaml(resolve(hparams_file, overrides))


def load_hparams(argv, record=True):
    """Parse ``hparams.yaml [--key=value ...]``, compose the yaml with its ``defaults``, apply the
    overrides, load it (it declares objects; no model is built) and, with ``record``, create the
    output folder with the composed, resolved ``hyperparams.yaml`` in it.

    ``--key=~/path`` is expanded to the home folder, as the shell does for ``--key ~/path`` but
    not after ``=``: a literal ``~`` folder in the recipe folder is never what was meant."""
    argv = [_expand_home(arg) for arg in argv]
    given = Counter(a[2:].split("=")[0] for a in argv if a.startswith("--"))
    twice = {key: n for key, n in given.items() if n > 1}
    if twice:  # SpeechBrain fails in ruamel (yaml keys) or keeps the last one (run options)
        raise ValueError("Given more than once on the command line: " + ", ".join(
            f"--{key} ({n} times)" for key, n in twice.items()) + ". Give each option once.")
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if isinstance(run_opts.optimizer_step_limit, str):
        # SpeechBrain 1.1's parser leaves this Optional[int] option a string: the documented
        # --optimizer_step_limit=N would fail at the first batch ('>=' between int and str)
        run_opts = dataclasses.replace(run_opts,
                                       optimizer_step_limit=int(run_opts.optimizer_step_limit))
    sb.utils.distributed.ddp_init_group(run_opts)  # under torchrun: one process group per run
    resolved = resolve(hparams_file, overrides)
    if record:  # before loading: the checkpointer creates its folder as it loads
        check_writable(str(ruamel.yaml.YAML(typ="rt").load(resolved)["output_folder"]))
    hparams = load_hyperpyyaml(resolved)
    if record:
        sb.create_experiment_directory(experiment_directory=hparams["output_folder"])
        if sb.utils.distributed.if_main_process():
            header = f"# {Path(hparams_file).resolve()} with its defaults, overrides: {overrides}\n"
            Path(hparams["output_folder"], "hyperparams.yaml").write_text(header + resolved,
                                                                         encoding="utf-8")
    return hparams, run_opts


def _expand_home(arg):
    key, eq, value = arg.partition("=")
    if key.startswith("--") and eq and (value == "~" or value.startswith("~/")):
        return f"{key}={os.path.expanduser(value)}"
    return arg


def check_writable(folder):
    """Stop before any work when the results folder cannot be written (read-only, a file in the
    way, no permission), naming it and the fix."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".speechtune_write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output_folder {folder} cannot be written ({err}). Pass "
                      "--output_folder=<a folder you can write, with room for checkpoints>.") \
            from err


def _loader_kwargs(hparams, dataset, stage):
    """Train: duration-budget batches (or fixed size); valid/test: fixed size, duration-sorted."""
    if stage == "train" and hparams["corpora"]:  # drawn by corpus weight (speechtune.mixing)
        return {"batch_sampler": mixing.batch_sampler(dataset, hparams),
                "num_workers": hparams["num_workers"]}
    if stage == "train" and hparams["dynamic_batching"]:
        sampler = data.dynamic_batch_sampler(
            dataset, hparams["max_batch_seconds"], hparams["num_buckets"], shuffle=True,
            seed=hparams["seed"], max_batch_ex=hparams["max_batch_utterances"],
            bucket_ratio=hparams.get("bucket_ratio"))  # a CTC key (hparams/ctc.yaml)
        return {"batch_sampler": sampler, "num_workers": hparams["num_workers"]}
    size = hparams["batch_size"] if stage == "train" else hparams["eval_batch_size"]
    return {"batch_size": size, "shuffle": stage == "train", "num_workers": hparams["num_workers"]}


@dataclass
class Experiment:
    """Everything ``fit``/``evaluate`` need, built from hparams (tests drive it step by step)."""

    brain: FineTuneBrain
    train: object
    valid: object
    tests: dict
    loader_kwargs: dict
    family: object = None  # the family's setup object (its model source, tokenizer, ...)

    def fit(self):
        """Train (the retain sets scored first on the model as loaded, ``speechtune.retain``)."""
        if self.brain.retain is not None:
            self.brain.retain.base = base_scores(self.brain, self.brain.retain,
                                                 self.brain.hparams.output_folder)
        self.brain.fit(self.brain.hparams.epoch_counter, self.train, self.valid,
                       train_loader_kwargs=self.loader_kwargs["train"],
                       valid_loader_kwargs=self.loader_kwargs["valid"])

    def zero_shot(self):
        """Test splits on the weights as loaded, before training (``zero_shot: True``); kept in
        ``zero_shot.json``, so a resumed run does not test them again."""
        path = Path(self.brain.hparams.output_folder) / "zero_shot.json"
        # under DDP the main process's view decides (it writes the file): a process deciding by
        # its own look could skip the evaluation's collectives the others enter
        if ddp_broadcast(path.is_file()):
            return json.loads(path.read_text(encoding="utf-8"))
        results = {name: {k: float(v) for k, v in self.brain.evaluate(
            ds, split=name, zero_shot=True, test_loader_kwargs=self.loader_kwargs[name]).items()}
            for name, ds in self.tests.items()}
        if sb.utils.distributed.if_main_process():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, path)
        return results

    def evaluate(self):
        """Test splits on the best-WER checkpoint; an average of several (``average_best``) is
        scored on the valid split too, since no validation during training saw it."""
        splits = dict(self.tests)
        if int(self.brain.hparams.average_best) > 1:
            splits = {"valid": self.valid, **splits}
        return {name: self.brain.evaluate(ds, split=name,
                                          test_loader_kwargs=self.loader_kwargs[name])
                for name, ds in splits.items()}


def group_columns(wanted, rows):
    """The manifest columns to score per value at test time (``group_columns`` in the yaml):
    ``auto`` = every column beyond the contract's except the keys the recipe computes (a
    replay row's ``utt_language``, ...), else the listed ones (each must exist)."""
    present = {c for split_rows in rows.values() for r in split_rows.values() for c in r}
    extra = sorted(present - set(data.REQUIRED_COLUMNS) - RESERVED)
    if wanted == "auto":
        return extra
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(f"group_columns: {missing} not in the manifests (their extra columns: "
                         f"{extra}); list existing ones, or use auto or []")
    return list(wanted)


def family_of(hparams, family=None):
    """The family class of a loaded yaml (its ``family`` key, from the base yaml); ``family``, if
    given (a recipe's own subclass), must be registered under that name."""
    registered = families.get(hparams["family"])
    if family is None:
        return registered
    if not issubclass(family, registered):
        raise ValueError(f"{family.__name__} is not a {hparams['family']} family, which the "
                         f"yaml's family key names: pass a subclass of {registered.__name__}")
    return family


def yaml_family(hparams_file):
    """The family class a recipe yaml names (its composed ``family`` key), read without loading
    the yaml (nothing is constructed, no folder made)."""
    return families.get(str(compose(hparams_file)["family"]))


def build_experiment(hparams, run_opts, prepare, family=None):
    """Prepare data, read the manifests, drop training utterances outside the duration limits,
    then run the family's ordered ``setup`` (``speechtune.family``), the pre-flight checks
    between its tokenizer and its datasets."""
    prepare = mixing.preparation(hparams, prepare)  # with corpora: theirs, merged
    run_on_main(prepare, args=[hparams])  # writes manifests once (DDP-safe)
    manifests = prepare(hparams)  # on every process: finds the manifests written above
    setup = family_of(hparams, family)(hparams)
    train_shards = shards.from_hparams(hparams)  # None: training audio from the manifest's files

    paths = {"train": manifests.train, "valid": manifests.valid, **manifests.tests}
    rows = {split: data.read_manifest(path, hparams["data_folder"])
            for split, path in paths.items()}
    rows["train"].update(replay_rows(hparams, rows["train"]))  # each with its utt_language
    lo, hi = hparams["min_duration"], hparams["max_duration"]
    outside = {i: r["duration"] for i, r in rows["train"].items()
               if not lo <= r["duration"] <= hi}
    if outside and len(outside) == len(rows["train"]):
        raise PreflightError(all_outside_message(outside.values(), lo, hi))
    rows["train"] = {i: r for i, r in rows["train"].items() if i not in outside}
    groups = group_columns(hparams["group_columns"], rows)
    retain_rows, retain_languages = read_retain_sets(hparams)
    rows.update(retain_rows)  # scored like test sets, each in its language
    languages = {split: manifests.languages.get(split, hparams["language"]) for split in rows}
    languages.update(retain_languages)
    apply_event_tags(EventTags(hparams["event_tags"], hparams["event_tag_brackets"],
                               hparams["event_tag_token"]), rows, languages)

    def preflight(chars, label_check):
        splits = {split: list(split_rows.values()) for split, split_rows in rows.items()}
        stats = None
        if hparams["preflight_audio_checks"]:  # decoded once, by the main process
            kwargs = {"paths": [r["wav"] for split, split_rows in splits.items()
                                if not (train_shards and split == "train") for r in split_rows],
                      "cache_path": hparams["preflight_audio_cache"] or cache_path(
                          manifests.train, hparams["output_folder"]),
                      "workers": hparams["num_workers"]}
            stats = collect_stats(**kwargs) if if_main_process() else None
            ddp_barrier()
            if stats is None:  # the other processes: read from the cache
                stats = collect_stats(**kwargs)
        return run_preflight(
            splits, chars, label_check, mode=hparams["preflight"],
            max_oov_rate=hparams["preflight_max_oov_rate"],
            report_path=Path(hparams["output_folder"]) / "preflight_report.tsv",
            excluded=[Problem(*found) for found in outside_limits(outside, lo, hi)],
            train_audio=shards.check(train_shards, splits["train"]) if train_shards else None,
            audio_stats=stats, limits=DegenerateLimits(
                hparams["preflight_min_level_dbfs"], hparams["preflight_max_clipped"],
                hparams["preflight_min_flatness_db"]))

    built = setup.setup(rows, languages, run_opts, preflight)
    brain = built.brain
    run_on_main(record_run, args=[hparams, setup, brain.optimizer_step_limit])
    brain.groups = {split: {i: {c: r.get(c, "") for c in groups} for i, r in split_rows.items()}
                    for split, split_rows in rows.items() if split != "train"} if groups else None
    if retain_rows:
        loaders = {split: brain.make_dataloader(
            built.tests.pop(split), stage=sb.Stage.VALID, ckpt_prefix=None,
            **_loader_kwargs(hparams, None, "valid")) for split in retain_rows}
        brain.retain = RetainGuard(loaders, hparams["retain_max_rise"])
    train = built.train if not train_shards else shards.train_loader(
        hparams, built.train, train_shards, brain.checkpointer)  # streams the shards' audio
    loader_kwargs = {"train": {} if train_shards else _loader_kwargs(hparams, built.train, "train"),
                     "valid": _loader_kwargs(hparams, built.valid, "valid")}
    loader_kwargs.update({name: _loader_kwargs(hparams, ds, "test")
                          for name, ds in built.tests.items()})
    return Experiment(brain, train, built.valid, built.tests, loader_kwargs, setup)


def record_run(hparams, setup, step_limit):
    """Write what the tools need to evaluate and export this run without its yaml:
    ``<output_folder>/run.json`` (the command that trains it, from where, its epochs and
    optimizer-step limit, the family's inference settings) and ``<save_folder>/model_files/``
    (the model's HF config, feature extractor and tokenizer files; the weights are in the
    checkpoints)."""
    run_file = Path(hparams["output_folder"]) / "run.json"
    info = {"family": setup.name, "script": str(Path(sys.argv[0]).resolve()),
            "cwd": os.getcwd(), "argv": sys.argv[1:],
            "epochs": hparams["epoch_counter"].limit,
            "optimizer_step_limit": step_limit,
            **setup.inference_settings()}
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1, ensure_ascii=False))
    os.replace(tmp, run_file)
    setup.save_model_files(Path(hparams["save_folder"]) / "model_files")


def run(argv, prepare, family=None):
    """Train and test a recipe. ``prepare(hparams)`` returns the corpus ``Manifests`` (or
    ``{name: prepare}``, the preparations the yaml's ``corpora`` name: ``speechtune.mixing``);
    ``family``: a subclass of the yaml's family (default: the registered class itself)."""
    hparams, run_opts = load_hparams(argv)
    experiment = build_experiment(hparams, run_opts, prepare, family)
    zero_shot = experiment.zero_shot() if hparams["zero_shot"] else {}
    base = gate.base_numbers(experiment, hparams) if hparams["robustness_gate"] else None
    experiment.fit()
    results = experiment.evaluate()
    if sb.utils.distributed.if_main_process():
        n = int(hparams["average_best"])
        which = "best-WER checkpoint" if n <= 1 else f"average of the {n} best checkpoints"
        if experiment.brain.retain is not None and experiment.brain.retain.max_rise is not None:
            which = "checkpoint chosen with the retain sets, below"
        for name, stats in results.items():
            before = zero_shot.get(name)
            was = (f"; zero-shot WER {before['WER']:.2f}%  CER {before['CER']:.2f}%"
                   if before else "")
            print(f"[speechtune] {name}: WER {stats['WER']:.2f}%  CER {stats['CER']:.2f}%  "
                  f"({which}{was}; alignments in {hparams['output_folder']}/wer_{name}.txt)")
        guard = experiment.brain.retain
        for line in guard.summary(experiment.brain.checkpointer) if guard else ():
            print(f"[speechtune] {line}")
    if base is not None:  # after the results above: a failing gate loses none of them
        text = gate.check(experiment, hparams, base)[2]
        if sb.utils.distributed.if_main_process():
            print(f"[speechtune] robustness gate ({hparams['output_folder']}/gate.md):\n{text}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # nothing else does it: a process left with the group's threads at interpreter exit
        # now and then aborted ("terminate called without an active exception") after all
        # its work was written, failing torchrun's exit code
        ddp_barrier()
        torch.distributed.destroy_process_group()
    return experiment, results
