#!/usr/bin/env python3
"""Make a recipe for a new language or corpus from an existing recipe (torchtune's ``tune cp``).

    python tools/new_recipe.py --from recipes/Synthetic/CTC --language da \\
        --corpus recipes/Synthetic/data/da --out recipes/MyDanish/CTC
    cd recipes/MyDanish/CTC && python train.py hparams/wavlm_tiny.yaml

``--corpus`` is a folder holding ``train``, ``valid`` and (optionally) ``test`` manifests (``.csv``
or ``.jsonl``), or one manifest, which is split into train/valid/test (every 20th row to valid,
every 20th from the 16th to test) in ``<out>/data/``. Manifest columns: ``audio``/``wav`` (relative
to the manifest's folder, absolute or ``$data_root/...``), ``text``/``wrd``, optional ``id``,
``speaker``, ``duration`` and group columns (``speechtune/prepare/custom.py``).

The new recipe holds ``hparams/<name>.yaml`` (the source yaml with the language, the data keys of
``speechtune.prepare.custom`` and the output folder changed), a ``train.py`` of a few lines, and a
``README.md`` with an empty results table; ``--fork`` adds ``brain.py``, a copy of the family's
Brain that ``train.py`` uses, to change the forward pass or the loss. Then the tool checks the
language's text normaliser, runs the recipe's pre-flight validation on the new data, prints the
CTC character vocabulary (or Whisper's prefix tokens) and trains a few batches (SpeechBrain's
``--debug``) into a throw-away folder (``--no_dry_run`` skips that). The pre-flight's output, its
report ``preflight_report.tsv`` and the prepared manifests, stays in ``<out>/preflight/`` (the
failure message points there); ``--preflight skip`` drops the training utterances it finds bad
instead of stopping, as ``train.py --preflight=skip`` does.

Paths go into the yaml as ruamel.yaml writes them (quoted where needed), so a folder name with
``: ``, `` #``, quotes, ``!``, ``&``, ``*`` or a leading space reads back as the same path.
"""

import argparse
import ast
import inspect
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from urllib.parse import quote, unquote

import ruamel.yaml
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from speechtune.data import write_manifest
from speechtune.preflight import PreflightError
from speechtune.prepare.custom import (
    ManifestError,
    columns,
    contract_rows,
    describe_missing_audio,
    prepare_custom,
    read_rows,
)
from speechtune.recipe import build_experiment, load_hparams, yaml_family
from speechtune.text import get_normalizer

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
# other preparations' keys (extra_tests: the bundled corpus's further test sets)
CORPUS_KEYS = ("manifest_folder", "train_splits", "dev_splits", "test_splits", "extra_tests")
MANIFEST_HELP = ("a CSV or JSONL manifest per split with columns audio (or wav) and text (or "
                 "wrd), optional id, speaker, duration and group columns; see "
                 "speechtune/prepare/custom.py")
YAML = ruamel.yaml.YAML(typ="rt")  # hyperpyyaml's reader
YAML.width = 1 << 30  # a long path stays on its key's line


class RecipeError(Exception):
    """Bad arguments or data: the message says what and how to fix it."""


def say(message):
    print(f"[new_recipe] {message}", flush=True)


def source_recipe(path, hparams_name):
    """The source recipe folder, its family class (its yaml's ``family``) and its hparams file."""
    folder = Path(path).resolve()
    available = sorted(str(p.parent.relative_to(REPO)) for p in REPO.glob("recipes/*/*/train.py"))
    if not (folder / "train.py").is_file() or not (folder / "hparams").is_dir():
        raise RecipeError(f"--from {path}: not a recipe (a folder with train.py and hparams/). "
                          f"Recipes: {', '.join(available)}")
    yamls = sorted(p.name for p in (folder / "hparams").glob("*.yaml"))
    if hparams_name is None and len(yamls) == 1:
        hparams_name = yamls[0]
    elif hparams_name is None:  # several: the recipe's default, the first its train.py runs
        named = re.search(r"hparams/([\w.-]+\.yaml)", (folder / "train.py").read_text())
        hparams_name = named and named[1]
    if hparams_name not in yamls:
        given = "no --hparams" if hparams_name is None else f"--hparams {hparams_name}"
        raise RecipeError(f"{given}: pass one of {yamls} (in {path}/hparams)")
    src_yaml = folder / "hparams" / hparams_name
    return folder, yaml_family(src_yaml), src_yaml


def corpus_manifests(corpus, out):
    """``{split: manifest path}`` of ``--corpus`` (a single manifest is split into ``out/data``)."""

    corpus = Path(corpus).resolve()
    if corpus.is_file():
        rows, header = contract_rows(corpus, "utt", corpus.parent)
        if len(rows) < 3:
            raise RecipeError(f"--corpus {corpus}: {len(rows)} utterance(s); at least 3 are "
                              "needed to split one manifest into train, valid and test.")
        parts = {"valid": rows[9::20], "test": rows[15::20] or rows[-1:]}
        parts["valid"] = parts["valid"] or rows[:1]
        held = {r["ID"] for p in parts.values() for r in p}
        parts["train"] = [r for r in rows if r["ID"] not in held]
        (out / "data").mkdir(parents=True, exist_ok=True)
        for row in rows:  # relative to out/data inside one checkout (the recipe can move)
            row["wav"] = relative(row["wav"], out / "data")
        for split, split_rows in parts.items():
            write_manifest(out / "data" / f"{split}.csv", split_rows, header)
        say(f"split {corpus.name}: train {len(parts['train'])}, valid {len(parts['valid'])}, "
            f"test {len(parts['test'])} utterances (by row, not by speaker) in {out / 'data'}")
        return {s: out / "data" / f"{s}.csv" for s in SPLITS}
    if not corpus.is_dir():
        why = describe_missing_audio(corpus) or "is not a folder or a manifest"
        raise RecipeError(f"--corpus {corpus} {why}: give {MANIFEST_HELP}, or a folder with "
                          "train.csv, valid.csv, test.csv (or .jsonl).")
    if (corpus / "train.tsv").is_file() and (corpus / "clips").is_dir():
        raise RecipeError(
            f"--corpus {corpus} is a CommonVoice release: no new recipe is needed, the "
            "CommonVoice recipes take the language as a parameter: cd recipes/CommonVoice/CTC "
            f"&& python train.py hparams/xls_r_300m.yaml --language=<code> --data_folder={corpus}"
            " (or recipes/CommonVoice/Whisper, hparams/whisper_small.yaml).")
    if next(corpus.rglob("*.parquet"), None) is not None:
        raise RecipeError(
            f"--corpus {corpus} holds parquet files (a Hugging Face dataset). For CoRal use "
            f"recipes/CoRal/CTC or recipes/CoRal/Whisper with --data_folder={corpus}; for "
            "another dataset write each utterance's audio to a file and a CSV manifest per split "
            "with columns audio, text and group columns (e.g. dialect, gender), and pass that "
            "folder.")
    found = {}
    for split in SPLITS:
        candidates = [corpus / f"{split}.{ext}" for ext in ("csv", "jsonl")]
        existing = [p for p in candidates if p.is_file()]
        if len(existing) > 1:
            raise RecipeError(f"--corpus {corpus}: both {existing[0].name} and "
                              f"{existing[1].name}; keep one.")
        if existing:
            found[split] = existing[0]
    missing = [s for s in ("train", "valid") if s not in found]
    if missing:
        looked = ", ".join(f"{s}.csv/.jsonl" for s in missing)
        raise RecipeError(f"--corpus {corpus}: no {' or '.join(missing)} manifest (looked for "
                          f"{looked}). Give {MANIFEST_HELP}.")
    return found


def data_root(manifests):
    """What ``$data_root`` in the manifests stands for: the first of the train manifest's folder
    and its two parents where the first such audio path exists (else that folder)."""

    train = Path(manifests["train"])
    for _, row in read_rows(train):
        audio = row.get("audio") or row.get("wav") or ""
        if audio.startswith("$data_root"):
            rel = audio[len("$data_root"):].lstrip("/\\")
            for folder in (train.parent, train.parent.parent, train.parent.parent.parent):
                if (folder / rel).is_file():
                    return folder
            break
    return train.parent


def relative(path, start):
    """``path`` relative to ``start`` inside one repository checkout, else absolute."""
    path, start = Path(os.path.abspath(path)), Path(os.path.abspath(start))
    inside = [p for p in path.parents if (p / ".git").exists()]
    if inside and inside[0] in start.parents:
        return os.path.relpath(path, start)
    return str(path)


def yaml_line(key, value, comment=None):
    """``key: value`` as one yaml line, the value written by ruamel.yaml: quoted where a path
    holds ``: ``, `` #``, a leading ``!``, ``&``, ``*``, quote or space (pasted as text these broke
    the yaml or, `` #``, cut the path short), and read back to check it is the same string."""
    for style in (str, DoubleQuotedScalarString):  # double quotes escape what the others lose
        text = io.StringIO()
        YAML.dump({key: style(value)}, text)
        line = text.getvalue().rstrip("\n")
        try:
            if "\n" not in line and YAML.load(line) == {key: value} and line.encode("utf-8"):
                return line + (f"   # {comment}" if comment else "")
        except (ruamel.yaml.YAMLError, UnicodeEncodeError):
            pass
    raise RecipeError(f"{value!r} cannot be written into a yaml as {key} (ruamel.yaml does not "
                      "read it back the same): rename that folder or file.")


def comment_text(text):
    """``text`` for a yaml comment line: a line break in it would end the comment."""
    return text if text.isprintable() else ascii(text)


def include_tag(target, written, src_yaml):
    """``written`` (the path to ``target``) for a yaml ``!include:`` tag: a tag holds no space,
    ``#``, quote ..., so those are %-escaped (ruamel.yaml decodes them)."""
    if not str(target).isascii():  # the recipe loader makes every include absolute
        raise RecipeError(f"{src_yaml} includes {target}, a path with non-ASCII characters: "
                          "ruamel.yaml reads them back garbled from a yaml tag (%-escapes as "
                          "Latin-1). Fix: move the repository to a folder with an ASCII path.")
    return "!include:" + quote(written, safe="/")


def override(key, value):
    """``--key=value`` for SpeechBrain's command line with ``value`` (a path) in yaml double
    quotes: SpeechBrain pastes ``key: value`` into yaml and splits the arguments at every ``=``
    (``\\x3d`` is ``=`` escaped), so a folder named with ``: ``, `` #`` or ``=`` broke it."""
    return f"--{key}=" + json.dumps(str(value), ensure_ascii=False).replace("=", "\\x3d")


def replace_key(lines, key, new):
    """Replace top-level ``key`` (and its indented continuation lines) by ``new``; drop it when
    ``new`` is None. Returns whether the key was there."""
    for i, line in enumerate(lines):
        if re.match(rf"{re.escape(key)}\s*:", line):
            end = i + 1
            while end < len(lines) and (lines[end][:1] in (" ", "\t")):
                end += 1
            lines[i:end] = [] if new is None else new
            return True
    return False


def new_yaml(src_yaml, out_yaml, family, language, manifests, root, name, recipe_name, command):
    """The source yaml with a new header, language, data keys and output folder."""
    text = src_yaml.read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    rel = {s: relative(p, out_yaml.parent.parent) for s, p in manifests.items()}
    src_rel = src_yaml.relative_to(REPO) if REPO in src_yaml.parents else src_yaml
    header = [
        "# " + "#" * 76,
        f"# Recipe:  {comment_text(recipe_name)} — {family.summary}, language `{language}`, on "
        "your own corpus",
        "# Data:    one manifest per split (CSV/JSONL; columns in speechtune/prepare/custom.py),",
        f"#          train: {comment_text(rel['train'])} (keys under data_folder below)",
        f"# Model:   as in {comment_text(str(src_rel))}, copied by tools/new_recipe.py;",
        "#          comments on timings and sizes below describe that recipe's corpus",
        f"# Run:     cd {comment_text(shlex.quote(recipe_name))} && {command}",
        "# Override example (other seed, fewer epochs, skip bad training utterances):",
        f"#          {command} --seed=2 --number_of_epochs=5 --preflight=skip",
        "# " + "#" * 76,
    ]
    body = lines[start:]
    replace_key(body, "language", None)
    body.insert(next(i for i, line in enumerate(body) if line.startswith("defaults:")) + 1,
                yaml_line("language", language, family.language_use))
    data = [
        "# Your corpus (speechtune.prepare.custom): one CSV/JSONL manifest per split, written as",
        "# contract manifests (ID,duration,wav,spk_id,wrd + group columns) into manifest_folder.",
        "# Relative audio paths start at each manifest's own folder.",
        yaml_line("data_folder", relative(root, out_yaml.parent.parent),
                  "what $data_root in audio paths stands for"),
        yaml_line("train_manifest", rel["train"]),
        yaml_line("valid_manifest", rel["valid"]),
        yaml_line("test_manifest", rel["test"], "null: no test split") if "test" in rel
        else "test_manifest: null    # null: no test split",
        "manifest_folder: !ref <output_folder>/manifests",
    ]
    for key in CORPUS_KEYS:  # the source corpus's own preparation keys
        replace_key(body, key, None)
    if not replace_key(body, "data_folder", data):
        raise RecipeError(f"{src_yaml} has no data_folder key: copy it by hand.")
    replace_key(body, "output_folder", [f"output_folder: !ref results/{name}_<language>/<seed>"])
    text = "\n".join(body)

    def moved(name):  # a path the source yaml gives relative to itself, from the new place
        target = (src_yaml.parent / name).resolve()
        return target, relative(target, out_yaml.parent)

    text = re.sub(r"!include:(\S+)", lambda m: include_tag(
        *moved(unquote(m[1])), src_yaml=src_yaml), text)
    text = re.sub(r"^defaults: (\S+)", lambda m: yaml_line("defaults", moved(m[1])[1]), text,
                  flags=re.M)
    leftover = [line for line in text.splitlines() if "<data_folder>/<language>" in line]
    if leftover:
        raise RecipeError(f"{src_yaml}: lines that assume the source corpus layout: {leftover}")
    return "\n".join(header) + "\n\n" + text.lstrip("\n") + "\n"


def train_py(family, recipe_name, yaml_name, source, fork):
    """A train.py of a few lines: the custom preparation and the family (or its forked Brain)."""
    module, brain, family = family.__module__, family.brain_class.__name__, family.__name__
    loop = f"this recipe's {brain} (brain.py)" if fork else f"{module}.{brain}"
    lines = ["#!/usr/bin/env python3",
             f'"""{recipe_name}: made by tools/new_recipe.py from {source}.', "",
             f"    python train.py hparams/{yaml_name}", "",
             "Preparation: speechtune.prepare.custom (the manifests named in the yaml); the "
             f"training loop:\n{loop}, on speechtune.brain.FineTuneBrain.", '"""', "",
             "import sys", ""]
    if fork:
        lines += [f"from brain import {brain}  # brain.py beside this file", ""]
    lines += sorted([f"from {module} import {family}", "from speechtune.recipe import run",
                     "from speechtune.prepare.custom import prepare_custom"]) + [""]
    if fork:
        lines += ["", f"class Family({family}):",
                  f'    """The {family[:-6]} recipe setup, training with brain.py\'s {brain}."""',
                  "", f"    brain_class = {brain}", "", ""]
        family = "Family"
    lines += ['if __name__ == "__main__":', f"    run(sys.argv[1:], prepare_custom, {family})", ""]
    return "\n".join(lines)


def brain_py(family):
    """brain.py: the family's Brain class, copied, with the imports it uses."""
    module_name, class_name = family.__module__, family.brain_class.__name__
    module = sys.modules[module_name]
    class_src = inspect.getsource(getattr(module, class_name))
    used = {n.id for n in ast.walk(ast.parse(class_src)) if isinstance(n, ast.Name)}
    imports, local = [], []
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            node.names = [a for a in node.names if (a.asname or a.name).split(".")[0] in used]
            if node.names:
                imports.append(ast.unparse(node))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in used \
                and node.name != class_name:
            local.append(node.name)
    if local:
        imports.append(f"from {module_name} import {', '.join(sorted(local))}")
    first = next((i for i, line in enumerate(imports) if line.startswith("from speechtune")), None)
    if first:  # isort's sections: third-party, then first-party
        imports.insert(first, "")
    doc = (f'"""This recipe\'s copy of {module_name}.{class_name}:\nchange its forward pass, '
           "loss or decoding here.\n\nThe loop it inherits (optimizers, LR schedules, freezing, "
           "validation, checkpoints) is\nspeechtune.brain.FineTuneBrain: override its methods "
           'here to change those too.\n"""')
    return doc + "\n\n" + "\n".join(imports) + "\n\n\n" + class_src


def readme(recipe_name, family, language, source, yaml_name, corpus, fork):
    module, brain = family.__module__, family.brain_class.__name__
    loop = (f"this recipe's `brain.py` (a copy of `{module}.{brain}`)" if fork
            else f"`{module}.{brain}`, shared by every corpus")
    kind = family.__name__.removesuffix("Family")
    return f"""# {recipe_name}: {kind} fine-tuning, language `{language}`

Made by `tools/new_recipe.py` from `{source}` (`{yaml_name}`) on {date.today().isoformat()}, for
the corpus in `{corpus}`. Preparation is `speechtune/prepare/custom.py` (the manifests named in
`hparams/{yaml_name}`); the training loop is {loop}.

```bash
python train.py hparams/{yaml_name}
```

## Results

One row per run, numbers from the run's own output (`results/.../train_log.txt`).

| hparams | data | hardware | command | test WER | test CER | date |
|---|---|---|---|---|---|---|
"""


def check_language(language, family):
    try:
        get_normalizer(language)
    except ValueError as err:
        raise RecipeError(f"{err} For this tool and the recipe, register it in "
                          "speechtune/text.py (add the code to the languages basic_normalize "
                          "serves if letters, digits and no punctuation fit).") from None
    try:
        family.check_language(language)
    except ValueError as err:
        raise RecipeError(str(err)) from None


def check_manifests(manifests):
    """Fail before writing anything on an empty manifest or missing columns."""

    for path in manifests.values():
        rows = read_rows(path)
        if not rows:
            raise ManifestError(f"{path}: the corpus manifest has no rows. Fix: {MANIFEST_HELP}.")
        columns(Path(path), rows)


def preflight(out, yaml_rel, family, folder, overrides):
    """The recipe's own pre-flight (preparation, vocabulary, data checks) on the new data, with
    ``folder`` as output folder: the prepared manifests and ``preflight_report.tsv`` stay there."""
    report = folder / "preflight_report.tsv"
    report.unlink(missing_ok=True)  # a report there is this run's, never an earlier one's
    cwd = os.getcwd()
    os.chdir(out)  # the yaml's relative paths start at the recipe folder, as for train.py
    try:
        hparams, run_opts = load_hparams([yaml_rel, override("output_folder", folder),
                                          *overrides], record=False)
        for name in list(logging.root.manager.loggerDict):  # keep our summary readable
            if name.startswith("speechbrain"):
                logging.getLogger(name).setLevel(logging.WARNING)
        experiment = build_experiment(hparams, run_opts, prepare_custom, family)
    finally:
        os.chdir(cwd)
    for split, dataset in [("train", experiment.train), ("valid", experiment.valid),
                           *experiment.tests.items()]:
        seconds = sum(float(dataset.data[i]["duration"]) for i in dataset.data_ids)
        say(f"  {split}: {len(dataset)} utterances, {seconds / 60:.1f} min")
    say(experiment.family.setup_summary())
    listed = report.read_text(encoding="utf-8").splitlines()[1:] if report.is_file() else []
    say(f"pre-flight report: {report} "
        f"({sum(not line.startswith('#') for line in listed)} utterance(s) listed)")


def dry_run(out, yaml_rel, folder, overrides):
    """A few batches of training, validation and test (SpeechBrain's --debug)."""
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "0"))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "train.py", yaml_rel, "--debug", "--debug_batches=2",
         "--debug_epochs=1", override("output_folder", folder), *overrides],
        cwd=out, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RecipeError(f"the dry run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tested = re.findall(r"\[speechtune\] (\S+): WER", proc.stdout)
    say(f"dry run: 2 training batches, validation and {', '.join(tested) or 'no test'} on 2 "
        f"batches each, in {time.time() - start:.0f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="source recipe folder")
    parser.add_argument("--language", required=True, help="language code, e.g. da, sv, de")
    parser.add_argument("--corpus", required=True, help="manifest file or folder of manifests")
    parser.add_argument("--out", required=True, help="new recipe folder")
    parser.add_argument("--hparams", help="source hparams file name (default: the only one, or "
                        "the first its train.py's docstring runs)")
    parser.add_argument("--fork", action="store_true", help="copy the family's Brain too")
    parser.add_argument("--force", action="store_true", help="overwrite the files it writes")
    parser.add_argument("--no_dry_run", action="store_true", help="skip the few-batch run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the pre-flight and dry run only (not written)")
    parser.add_argument("--preflight", choices=("error", "skip"),
                        help="the pre-flight and dry run's --preflight (default: the yaml's, "
                        "error); skip drops bad training utterances, listed in the report")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    overrides = [f"--{kv}" for kv in args.set]
    overrides += [f"--preflight={args.preflight}"] if args.preflight else []
    made_out = False
    report = out / "preflight" / "preflight_report.tsv"
    try:
        set_keys = {kv.split("=", 1)[0] for kv in args.set}
        if "output_folder" in set_keys:
            raise RecipeError("--set output_folder: the tool sets it (<out>/preflight for the "
                              "pre-flight, a temporary folder for the dry run); drop it.")
        if args.preflight and "preflight" in set_keys:
            raise RecipeError(f"--preflight {args.preflight} and --set preflight=...: give one.")
        src, family, src_yaml = source_recipe(args.source, args.hparams)
        check_language(args.language, family)
        if out.exists() and not args.force:
            raise RecipeError(f"--out {args.out} exists; pass --force to overwrite the recipe "
                              "files in it (results are kept), or choose another folder.")
        made_out = not out.exists()
        manifests = corpus_manifests(args.corpus, out)
        check_manifests(manifests)
        root = data_root(manifests)
        recipe_name = str(out.relative_to(REPO)) if REPO in out.parents else str(out)
        source = str(src.relative_to(REPO)) if REPO in src.parents else str(src)
        yaml_rel = f"hparams/{src_yaml.name}"
        (out / "hparams").mkdir(parents=True, exist_ok=True)
        (out / yaml_rel).write_text(new_yaml(
            src_yaml, out / yaml_rel, family, args.language, manifests, root, src_yaml.stem,
            recipe_name, f"python train.py {yaml_rel}"), encoding="utf-8")
        (out / "train.py").write_text(train_py(family, recipe_name, src_yaml.name, source,
                                               args.fork), encoding="utf-8")
        (out / "README.md").write_text(readme(recipe_name, family, args.language, source,
                                              src_yaml.name, args.corpus, args.fork),
                                       encoding="utf-8")
        if args.fork:
            (out / "brain.py").write_text(brain_py(family), encoding="utf-8")
        made_out = False  # the recipe exists now: kept whatever the checks say
        written = ["train.py", yaml_rel, "README.md", *(["brain.py"] if args.fork else [])]
        say(f"wrote {recipe_name}/: {', '.join(written)} (from {source}, {family.__name__}, "
            f"language {args.language})")
        if "$data_root" in Path(manifests["train"]).read_text(encoding="utf-8"):
            say(f"$data_root in the manifests' audio paths = {root} (data_folder in the yaml)")
        say(f"pre-flight on the new data (its output stays in {report.parent}):")
        preflight(out, yaml_rel, family, report.parent, overrides)
        if not args.no_dry_run:
            with tempfile.TemporaryDirectory(prefix="new_recipe_") as tmp:
                dry_run(out, yaml_rel, Path(tmp) / "dry_run", overrides)
    except (RecipeError, ManifestError, PreflightError) as err:
        if made_out and out.exists():
            shutil.rmtree(out)
        skip = " (or, to drop the bad training utterances, add --preflight skip)" if \
            isinstance(err, PreflightError) and "--preflight=skip" in str(err) else ""
        kept = "" if made_out or not (out / "train.py").exists() else (
            f"\n(The recipe in {out} is written; fix the data, then run its train.py or this "
            f"command again with --force{skip}.)")
        if isinstance(err, PreflightError) and report.is_file() and str(report) not in str(err):
            kept += f"\n(The pre-flight report: {report})"
        print(f"[new_recipe] error: {err}{kept}", file=sys.stderr)
        return 2
    skip = args.preflight == "skip" or "preflight=skip" in args.set  # the yaml says error
    skip = " --preflight=skip" if skip else ""
    say(f"next: cd {shlex.quote(recipe_name)} && python train.py {yaml_rel}{skip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
