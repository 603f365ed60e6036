"""The shared recipe runner: hparams -> manifests -> pre-flight -> datasets -> Brain -> results.

A recipe's ``train.py`` only supplies its corpus preparation (``prepare(hparams) -> Manifests``);
everything else, identical for every corpus, lives here.
"""

import dataclasses
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ruamel.yaml
import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml, resolve_references
from speechbrain.utils.distributed import ddp_broadcast, run_on_main

from speechtune import data
from speechtune.brain import FineTuneBrain
from speechtune.checkpoints import RNGState
from speechtune.preflight import Problem, run_preflight


@dataclass
class Manifests:
    """What a corpus preparation returns: one CSV per split (several test sets allowed), and the
    language of each test set that is not in the run's ``language`` (a held-out English set of a
    Danish run is decoded and scored as English)."""

    train: str
    valid: str
    tests: dict[str, str] = field(default_factory=dict)
    languages: dict[str, str] = field(default_factory=dict)


def load_hparams(argv):
    """Parse ``hparams.yaml [--key=value ...]``, load the yaml, create the output folder.

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
    with open(hparams_file, encoding="utf-8") as f:  # before loading: it builds models there
        resolved = ruamel.yaml.YAML(typ="rt").load(resolve_references(f, overrides))
    check_writable(str(resolved["output_folder"]))
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
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
    if stage == "train" and hparams["dynamic_batching"]:
        sampler = data.dynamic_batch_sampler(
            dataset, hparams["max_batch_seconds"], hparams["num_buckets"], shuffle=True,
            seed=hparams["seed"], max_batch_ex=hparams["max_batch_utterances"])
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

    def fit(self):
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
    ``auto`` = every column beyond the contract's, else the listed ones (each must exist)."""
    present = {c for split_rows in rows.values() for r in split_rows.values() for c in r}
    extra = sorted(present - set(data.REQUIRED_COLUMNS))
    if wanted == "auto":
        return extra
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(f"group_columns: {missing} not in the manifests (their extra columns: "
                         f"{extra}); list existing ones, or use auto or []")
    return list(wanted)


def build_experiment(hparams, run_opts, prepare, family):
    """Prepare data, run the pre-flight checks, build datasets and the family's Brain.

    ``family`` (``speechtune.ctc.CTCFamily``, ``speechtune.whisper.WhisperFamily``) supplies what
    differs between model families: texts, tokenizer, label checks, pipelines, modules.
    """
    run_on_main(prepare, args=[hparams])  # writes manifests once (DDP-safe)
    manifests = prepare(hparams)  # on every process: finds the manifests written above
    setup = family(hparams)

    paths = {"train": manifests.train, "valid": manifests.valid, **manifests.tests}
    rows = {split: data.read_manifest(path, hparams["data_folder"])
            for split, path in paths.items()}
    lo, hi = hparams["min_duration"], hparams["max_duration"]
    outside = {i: r["duration"] for i, r in rows["train"].items()
               if not lo <= r["duration"] <= hi}
    rows["train"] = {i: r for i, r in rows["train"].items() if i not in outside}
    groups = group_columns(hparams["group_columns"], rows)
    languages = {split: manifests.languages.get(split, hparams["language"]) for split in rows}
    # references ("words") and targets, normalised as the family says for each split's language
    setup.set_texts(rows, languages)
    vocab = setup.build_tokenizer(rows["train"])
    dropped = run_preflight(
        {split: list(split_rows.values()) for split, split_rows in rows.items()},
        vocab, setup.label_check(), mode=hparams["preflight"],
        max_oov_rate=hparams["preflight_max_oov_rate"],
        report_path=Path(hparams["output_folder"]) / "preflight_report.tsv",
        excluded=[Problem("train", i, "outside_duration_limits",
                          f"{d:.3f} s, not within [{lo}, {hi}] s (min_duration, max_duration)")
                  for i, d in sorted(outside.items())],
    )

    datasets = {
        split: data.make_dataset({i: r for i, r in split_rows.items() if i not in dropped[split]},
                                 sort_by_duration=split != "train")
        for split, split_rows in rows.items()
    }
    train, valid = datasets.pop("train"), datasets.pop("valid")
    tests = datasets
    setup.add_pipelines([train, valid, *tests.values()])

    # a resumed run draws what the uninterrupted one would have (checkpoints of runs from before
    # this was recorded resume without it)
    hparams["checkpointer"].add_recoverable("rng", RNGState(), optional_load=True)
    brain = setup.brain_class(modules=setup.modules(), hparams=hparams, run_opts=run_opts,
                              checkpointer=hparams["checkpointer"])
    run_on_main(record_run, args=[hparams, setup, brain.optimizer_step_limit])
    brain.split_languages = languages
    setup.configure(brain)
    brain.groups = {split: {i: {c: r.get(c, "") for c in groups} for i, r in split_rows.items()}
                    for split, split_rows in rows.items() if split != "train"} if groups else None
    loader_kwargs = {"train": _loader_kwargs(hparams, train, "train"),
                     "valid": _loader_kwargs(hparams, valid, "valid")}
    loader_kwargs.update({name: _loader_kwargs(hparams, ds, "test") for name, ds in tests.items()})
    return Experiment(brain, train, valid, tests, loader_kwargs)


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


def run(argv, prepare, family):
    """Train and test a recipe. ``prepare(hparams)`` returns the corpus ``Manifests``;
    ``family`` is the model family's setup class (``CTCFamily``, ``WhisperFamily``)."""
    hparams, run_opts = load_hparams(argv)
    experiment = build_experiment(hparams, run_opts, prepare, family)
    zero_shot = experiment.zero_shot() if hparams["zero_shot"] else {}
    experiment.fit()
    results = experiment.evaluate()
    if sb.utils.distributed.if_main_process():
        n = int(hparams["average_best"])
        which = "best-WER checkpoint" if n <= 1 else f"average of the {n} best checkpoints"
        for name, stats in results.items():
            before = zero_shot.get(name)
            was = (f"; zero-shot WER {before['WER']:.2f}%  CER {before['CER']:.2f}%"
                   if before else "")
            print(f"[speechtune] {name}: WER {stats['WER']:.2f}%  CER {stats['CER']:.2f}%  "
                  f"({which}{was}; alignments in {hparams['output_folder']}/wer_{name}.txt)")
    return experiment, results
