"""tools/new_recipe.py: a recipe for a new language that trains, a forked Brain, clear errors."""

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
import ruamel.yaml
from fakes import MICRO_ENCODER, MICRO_WHISPER, REPO, SYNTHETIC, run_recipe, write_subset

from speechtune import data, recipe

TOOL = REPO / "tools" / "new_recipe.py"
CTC, WHISPER = "recipes/Synthetic/CTC", "recipes/Synthetic/Whisper"
MICRO_CTC = f"tiny_config={json.dumps(MICRO_ENCODER)}"
MICRO_WH = f"tiny_config={json.dumps(MICRO_WHISPER)}"


def new_recipe(*args, check=True):
    """Run the tool in a subprocess (it loads a yaml and trains: keep pytest's process clean)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"new_recipe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("new_recipe", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small_da(tmp_path):
    """A Danish corpus folder: train/valid/test.csv, absolute audio paths."""
    return write_subset(SYNTHETIC / "da", tmp_path / "corpus", {"train": 40, "valid": 8,
                                                                "test": 8})


@pytest.mark.recipe
def test_danish_ctc_recipe_from_the_bundled_data_trains_one_epoch(tmp_path):
    out = tmp_path / "MyDanish" / "CTC"
    proc = new_recipe("--from", CTC, "--language", "da", "--corpus", "recipes/Synthetic/data/da",
                      "--out", str(out), "--no_dry_run", "--set", MICRO_CTC, "--set", "device=cpu")
    log = proc.stdout
    assert "(from recipes/Synthetic/CTC, CTCFamily, language da)" in log
    assert f"$data_root in the manifests' audio paths = {SYNTHETIC}" in log
    assert "train: 267 utterances" in log and "test: 30 utterances" in log
    vocab = re.search(r"CTC vocabulary \(\d+ characters \+ blank \+ unk\): (\S+)", log)[1]
    assert {"æ", "ø", "å", "␣"} <= set(vocab) and not re.search("[A-Z.,]", vocab)

    yaml = (out / "hparams" / "wavlm_tiny.yaml").read_text(encoding="utf-8")
    head = yaml.split("\n\n")[0]  # the header the hparams tests ask of every recipe
    assert "# Recipe:" in head and "# Run:" in head and "python train.py" in head
    assert "Override example" in head
    assert re.search(r"^language: da\b", yaml, re.M)
    assert re.search(rf"^train_manifest: {SYNTHETIC}/da/train.csv$", yaml, re.M)
    train_py = (out / "train.py").read_text()
    assert "run(sys.argv[1:], prepare_custom, CTCFamily)" in train_py
    assert len(train_py.splitlines()) < 25 and "def " not in train_py  # no training loop
    assert "| hparams | data | hardware | command | test WER | test CER | date |" in (
        out / "README.md").read_text()

    # one epoch on the first 60 training utterances (a yaml key like any other: overridable)
    lines = (SYNTHETIC / "da" / "train.csv").read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "train60.csv").write_text("".join(lines[:61]), encoding="utf-8")  # $data_root
    results = tmp_path / "results"
    proc = run_recipe(out, ["hparams/wavlm_tiny.yaml", "--number_of_epochs=1",
                            f"--train_manifest={tmp_path / 'train60.csv'}",
                            f"--output_folder={results}", f"--{MICRO_CTC}", "--device=cpu"])
    assert re.search(r"test: WER \d+\.\d+%  CER \d+\.\d+%", proc.stdout), proc.stdout[-2000:]
    assert re.search("[æøå]", (results / "save" / "label_encoder.txt").read_text())
    manifest = (results / "manifests" / "train.csv").read_text(encoding="utf-8")
    assert manifest.startswith("ID,duration,wav,spk_id,wrd,voice,gender\n")
    assert manifest.count("\n") == 61 and f"{SYNTHETIC}/da/wav/da_train_0000.flac" in manifest
    assert (results / "manifests" / "test.csv").read_text().count("\n") == 31


@pytest.mark.recipe
def test_fork_copies_the_brain_and_train_py_uses_the_copy(tmp_path, small_da):
    out = tmp_path / "Forked" / "CTC"
    new_recipe("--from", CTC, "--language", "da", "--corpus", str(small_da), "--out", str(out),
               "--fork", "--no_dry_run", "--set", MICRO_CTC)  # the Whisper test runs a dry run
    brain = (out / "brain.py").read_text()
    assert "class CTCBrain(FineTuneBrain):" in brain and "def compute_objectives" in brain
    assert "from brain import CTCBrain" in (out / "train.py").read_text()
    # a change to the copy shows in the run: train.py trains with it
    brain = brain.replace('        """CTC loss in fp32 outside autocast; WER/CER in valid/test."""',
                          '        """CTC loss."""\n        print("FORKED-BRAIN", stage)', 1)
    (out / "brain.py").write_text(brain)
    proc = run_recipe(out, ["hparams/wavlm_tiny.yaml", "--number_of_epochs=1", "--device=cpu",
                            f"--output_folder={tmp_path / 'results'}", f"--{MICRO_CTC}"])
    assert "FORKED-BRAIN Stage.TRAIN" in proc.stdout and "FORKED-BRAIN Stage.TEST" in proc.stdout
    assert re.search(r"test: WER \d+\.\d+%", proc.stdout)


@pytest.mark.recipe
def test_whisper_recipe_passes_preflight_and_a_dry_run(tmp_path, small_da):
    out = tmp_path / "MyDanish" / "Whisper"
    proc = new_recipe("--from", WHISPER, "--language", "da", "--corpus", str(small_da),
                      "--out", str(out), "--set", MICRO_WH, "--set", "device=cpu")
    assert "Whisper prefix: <|startoftranscript|><|da|><|transcribe|>" in proc.stdout
    # the dry run is train.py itself: the tiny Whisper's BPE is trained on the prepared text
    assert re.search(r"dry run: 2 training batches, validation and test", proc.stdout)
    yaml = (out / "hparams" / "whisper_tiny.yaml").read_text()
    defaults = re.search(r"^defaults: (\S+)", yaml, re.M)[1]  # rewritten for the new place
    assert (out / "hparams" / defaults).resolve() == REPO / "hparams" / "whisper.yaml"
    assert "<data_folder>/<language>" not in yaml
    assert "extra_tests" not in yaml  # the bundled corpus's further test sets stay behind


def test_one_jsonl_manifest_is_split_with_paths_relative_in_a_checkout(tmp_path):
    (tmp_path / ".git").mkdir()  # a repository checkout: paths in the yaml stay relative
    corpus = write_subset(SYNTHETIC / "da", tmp_path / "sv", {"train": 40})
    lines = (corpus / "train.csv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [dict(zip(["id", "duration", "audio", "speaker", "text"], line.split(","),
                     strict=False)) for line in lines]
    for row in rows:
        (corpus / "clips").mkdir(exist_ok=True)
        shutil.copy(row["audio"], corpus / "clips")
        row["audio"] = "clips/" + os.path.basename(row["audio"])  # relative to the manifest
        del row["duration"]
    (corpus / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "recipes" / "MySwedish" / "CTC"
    proc = new_recipe("--from", CTC, "--language", "sv", "--corpus", str(corpus / "all.jsonl"),
                      "--out", str(out), "--no_dry_run", "--set", MICRO_CTC)
    assert "train 36, valid 2, test 2 utterances" in proc.stdout
    assert "train: 36 utterances" in proc.stdout  # the pre-flight read the split
    yaml = (out / "hparams" / "wavlm_tiny.yaml").read_text()
    assert re.search(r"^train_manifest: data/train.csv$", yaml, re.M)
    assert re.search(r"^data_folder: data ", yaml, re.M)
    split = (out / "data" / "valid.csv").read_text().splitlines()
    assert split[1].split(",")[2] == f"../../../../sv/clips/{rows[9]['id']}.flac"
    assert re.search(r"^language: sv\b", yaml, re.M)
    assert "!include:../../../../" not in yaml  # points at the repository's augment.yaml
    assert f"!include:{REPO}/hparams/augment.yaml" in yaml


def run_tool(tool, capsys, *args):
    code = tool.main(list(args))
    return code, capsys.readouterr().err


def test_unknown_source_recipe(tool, capsys, tmp_path):
    code, err = run_tool(tool, capsys, "--from", "recipes/Nope/CTC", "--language", "da",
                         "--corpus", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2 and "recipes/Nope/CTC: not a recipe" in err
    assert "recipes/Synthetic/CTC" in err  # lists the recipes there are
    assert not (tmp_path / "out").exists()


def test_language_without_a_normaliser(tool, capsys, tmp_path, small_da):
    code, err = run_tool(tool, capsys, "--from", CTC, "--language", "xx", "--corpus",
                         str(small_da), "--out", str(tmp_path / "out"))
    assert code == 2 and "No text normaliser for language 'xx'" in err
    assert "register_normalizer('xx')" in err and "speechtune/text.py" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files,message", [
    ({}, r"no train or valid manifest \(looked for train.csv/.jsonl, valid.csv/.jsonl\)"),
    ({"train.csv": "audio,text\n", "valid.csv": "audio,text\na.wav,hej\n"},
     r"train.csv: the corpus manifest has no rows"),
    ({"train.jsonl": "", "valid.jsonl": ""}, r"train.jsonl: the corpus manifest has no rows"),
    ({"train.csv": "file,words\na,b\n", "valid.csv": "a,b\n"}, r"no `audio` or `wav`"),
    ({"train.tsv": "", "clips/x": ""}, r"CommonVoice release: no new recipe is needed.*"
                                       r"recipes/CommonVoice/CTC.*--language=<code>"),
    ({"data/read_aloud/train-0.parquet": ""}, r"parquet.*recipes/CoRal/CTC.*CSV manifest"),
])
def test_empty_or_unsupported_corpus(tool, capsys, tmp_path, files, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in files.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(text)
    code, err = run_tool(tool, capsys, "--from", CTC, "--language", "da", "--corpus",
                         str(corpus), "--out", str(tmp_path / "out"))
    assert code == 2 and re.search(message, err, re.S), err
    assert not (tmp_path / "out").exists()  # nothing half-made is left behind


def test_a_corpus_folder_named_in_another_unicode_form_is_named(tool, capsys, tmp_path,
                                                                small_da):
    """macOS writes names in NFD; typed in NFC, the folder is 'not there as spelled' and the
    message names the one on disk (it said only 'does not exist')."""
    on_disk = small_da.rename(tmp_path / unicodedata.normalize("NFD", "k\u00e5r"))
    code, err = run_tool(tool, capsys, "--from", CTC, "--language", "da", "--corpus",
                         str(tmp_path / "k\u00e5r"), "--out", str(tmp_path / "out"))
    assert code == 2 and "is not there as spelled, but" in err and str(on_disk) in err, err


def test_existing_out_needs_force(tool, capsys, tmp_path, small_da):
    (tmp_path / "out").mkdir()
    code, err = run_tool(tool, capsys, "--from", CTC, "--language", "da", "--corpus",
                         str(small_da), "--out", str(tmp_path / "out"))
    assert code == 2 and "exists; pass --force" in err
    assert list((tmp_path / "out").iterdir()) == []


# Folder names that are yaml syntax when pasted into a yaml line: pasted as text, `: ` stopped
# the recipe with a ruamel error, ` #` silently cut the path at the comment, a leading `!`, `&`,
# `*`, quote or space read as a tag, anchor, alias, quoted or trimmed string.
ODD_NAMES = {"colon": "a: b", "hash": "a #b", "single": "it's", "double": 'say "x"',
             "bang": "!x", "amp": "&x", "star": "*x", "space": " lead", "equals": "a=b",
             "percent": "a%20b", "ref": "<seed>", "newline": "a\nb", "danish": "æøå",
             "nfc": unicodedata.normalize("NFC", "blåbær"),
             "nfd": unicodedata.normalize("NFD", "blåbær")}


@pytest.fixture(scope="module")
def odd_source(tmp_path_factory):
    """The Synthetic CTC recipe's yaml and its base yamls under a folder with yaml syntax in its
    name, so the rewritten `defaults:` and `!include:` paths hold it too."""
    root = tmp_path_factory.mktemp("src") / "src: #'\"!&* =%20"
    (root / "hparams").mkdir(parents=True)
    for name in ("ctc.yaml", "augment.yaml"):
        shutil.copy(REPO / "hparams" / name, root / "hparams")
    (root / "recipes" / "Synthetic" / "CTC" / "hparams").mkdir(parents=True)
    return Path(shutil.copy(REPO / CTC / "hparams" / "wavlm_tiny.yaml",
                            root / "recipes" / "Synthetic" / "CTC" / "hparams"))


@pytest.mark.parametrize("inside", [True, False], ids=["relative", "absolute"])
@pytest.mark.parametrize("name", list(ODD_NAMES.values()), ids=list(ODD_NAMES))
def test_paths_with_yaml_syntax_read_back_as_written(tool, tmp_path, odd_source, name, inside):
    """Relative (a corpus inside the recipe folder, in a checkout: the value starts with the
    name) and absolute (outside a checkout), as the recipe loader reads the written yaml."""
    out = tmp_path / f"recipe {name}" / "CTC"
    if inside:
        (tmp_path / ".git").mkdir()
    corpus = out / name if inside else tmp_path / name / "corpus"
    manifests = {s: corpus / f"{s}.csv" for s in ("train", "valid", "test")}
    if name == ODD_NAMES["nfd"]:  # its NFC twin beside it: a normalised path would find that
        (corpus.parent / unicodedata.normalize("NFC", corpus.name)).mkdir(parents=True)
    out_yaml = out / "hparams" / "wavlm_tiny.yaml"
    out_yaml.parent.mkdir(parents=True)
    family = SimpleNamespace(summary="CTC", language_use="text normaliser")
    out_yaml.write_text(tool.new_yaml(odd_source, out_yaml, family, "da", manifests, corpus,
                                      "wavlm_tiny", str(out), "python train.py x.yaml"),
                        encoding="utf-8")
    hparams = ruamel.yaml.YAML(typ="rt").load(recipe.resolve(out_yaml))
    for key, path in [("data_folder", corpus), *((f"{s}_manifest", p)
                                                 for s, p in manifests.items())]:
        value = str(hparams[key])
        assert (str(out / value) if inside else value) == str(path), key
        assert value.startswith(name if inside else str(tmp_path)), key
    assert hparams["language"] == "da" and hparams["family"] == "ctc"  # the defaults were found
    # the !include: was read: augment.yaml's keys, with the recipe's own values over them
    assert hparams["augmentation"]["speeds"] == [90, 100, 110]
    assert "min_augmentations" in hparams["augmentation"]


def test_an_include_path_ruamel_cannot_read_back_is_refused(tool, tmp_path):
    """ruamel.yaml reads %-escaped non-ASCII in a tag back as Latin-1 (and refuses it raw): a
    repository under such a folder gets a message, not a garbled path to a missing file."""
    source = tmp_path / "kode på dansk" / "hparams" / "wavlm_tiny.yaml"
    source.parent.mkdir(parents=True)
    source.write_text("defaults: ctc.yaml\ndata_folder: x\noutput_folder: x\n"
                      "augmentation: !include:augment.yaml\n")
    family = SimpleNamespace(summary="CTC", language_use="")
    with pytest.raises(tool.RecipeError, match=r"includes .*kode på dansk/hparams/augment.yaml, "
                                               r"a path with non-ASCII characters.*Fix: move"):
        tool.new_yaml(source, tmp_path / "out" / "hparams" / "x.yaml", family, "da",
                      {"train": source, "valid": source}, tmp_path, "x", "out", "python x")


def copy_with_audio(corpus):
    """``corpus`` (absolute audio paths into the bundled data) with its audio copied into
    ``corpus/wav`` and named relative to the manifests."""
    (corpus / "wav").mkdir()
    for split in ("train", "valid", "test"):
        with open(corpus / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            shutil.copy(row["wav"], corpus / "wav")
            row["wav"] = f"wav/{os.path.basename(row['wav'])}"
        with open(corpus / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return corpus


def test_a_corpus_and_recipe_under_odd_folder_names_pass_the_preflight(tmp_path, small_da):
    odd = " odd: #'\"!&*=%20 " + unicodedata.normalize("NFD", "blåbær")
    corpus = copy_with_audio(Path(shutil.move(small_da, tmp_path / odd)))
    out = tmp_path / f"{odd} recipe" / "CTC"
    proc = new_recipe("--from", CTC, "--language", "da", "--corpus", str(corpus), "--out",
                      str(out), "--no_dry_run", "--set", MICRO_CTC)
    assert "train: 40 utterances" in proc.stdout and "test: 8 utterances" in proc.stdout
    hparams = recipe.compose(out / "hparams" / "wavlm_tiny.yaml")
    assert [hparams[k] for k in ("data_folder", "train_manifest", "test_manifest")] == [
        str(corpus), str(corpus / "train.csv"), str(corpus / "test.csv")]
    prepared = data.read_manifest(out / "preflight" / "manifests" / "train.csv", "unused")
    assert next(iter(prepared.values()))["wav"].startswith(f"{corpus}/wav/")
    assert (out / "preflight" / "preflight_report.tsv").is_file()  # kept


def test_a_failed_preflight_keeps_its_report_and_preflight_skip_drops_the_utterance(
        tmp_path, small_da):
    """The pre-flight's message says 'pass --preflight=skip' and names its report: the tool
    takes that option, and the report stays in the recipe folder after the tool exits."""
    lines = (small_da / "train.csv").read_text(encoding="utf-8").splitlines(True)
    utt, seconds, rest = lines[5].split(",", 2)
    lines[5] = f"{utt},{float(seconds) + 1.0:.3f},{rest}"  # a manifest duration 1 s off
    (small_da / "train.csv").write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "MyDanish" / "CTC"
    args = ["--from", CTC, "--language", "da", "--corpus", str(small_da), "--out", str(out),
            "--no_dry_run", "--set", MICRO_CTC]
    proc = new_recipe(*args, check=False)
    assert proc.returncode == 2 and f"duration_mismatch: 1 utterance(s), e.g. train/{utt}" in \
        proc.stderr and "pass --preflight=skip" in proc.stderr, proc.stderr[-3000:]
    assert "command again with --force (or, to drop the bad training utterances, add " \
        "--preflight skip)" in proc.stderr  # a rerun needs both: the recipe is written
    report = Path(re.search(r"listed in the report (\S+preflight_report\.tsv)", proc.stderr)[1])
    assert report == out / "preflight" / "preflight_report.tsv"
    assert f"train\t{utt}\tduration_mismatch\t" in report.read_text(encoding="utf-8")

    proc = new_recipe(*args, "--force", "--preflight=skip")
    assert "train: 39 utterances" in proc.stdout
    assert f"pre-flight report: {report} (1 utterance(s) listed)" in proc.stdout
    assert "python train.py hparams/wavlm_tiny.yaml --preflight=skip" in proc.stdout
    assert f"train\t{utt}\tduration_mismatch\t" in report.read_text(encoding="utf-8")


@pytest.mark.parametrize("extra,message", [
    (["--preflight", "skip", "--set", "preflight=skip"], r"--preflight skip and --set "
                                                          r"preflight=\.\.\.: give one"),
    (["--set", "output_folder=x"], r"--set output_folder: the tool sets it"),
])
def test_options_the_tool_sets_itself_are_refused_once(tool, capsys, tmp_path, small_da, extra,
                                                       message):
    code, err = run_tool(tool, capsys, "--from", CTC, "--language", "da", "--corpus",
                         str(small_da), "--out", str(tmp_path / "out"), *extra)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "out").exists()
