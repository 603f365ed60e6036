"""tools/compare.py: the paired comparison of two runs, on run folders a real test stage wrote
(the micro CTC and Whisper models) and on constructed ones written by the same writer."""

import csv
import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from fakes import MICRO_WHISPER, REPO, SYNTHETIC, experiment, write_subset
from speechbrain.utils.metric_stats import ErrorRateStats

from speechtune.metrics import read_alignments, read_hypotheses, utterance_errors, write_test_files
from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import build_experiment, load_yaml
from speechtune.text import basic_normalize

TOOL = REPO / "tools" / "compare.py"
WHISPER_YAML = REPO / "recipes" / "Synthetic" / "Whisper" / "hparams" / "whisper_tiny.yaml"
spec = importlib.util.spec_from_file_location("compare_tool", TOOL)
compare_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_tool)


def tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def make_run(folder, texts, groups=None, language="en", split="test"):
    """A run folder holding what compare.py reads, written by the test stage's own writer:
    ``texts`` ``{id: (raw reference, raw hypothesis)}``, scored after ``basic_normalize``."""
    folder.mkdir(parents=True, exist_ok=True)
    wer = ErrorRateStats()
    for utt, (ref, hyp) in texts.items():
        wer.append([utt], [basic_normalize(hyp).split()], [basic_normalize(ref).split()])
    write_test_files(SimpleNamespace(
        hparams=SimpleNamespace(output_folder=str(folder), language=language),
        test_name=split, test_split=split, wer_metric=wer, hypotheses=dict(texts),
        split_languages={}, groups={split: groups} if groups else None))
    return folder


def rows_of(report, normalizer, group="all"):
    """The report's rows of one normaliser, by split (group: "all" or "column=value")."""
    return {r["split"]: r for r in report["rows"] if r["normalizer"] == normalizer and (
        f"{r['column']}={r['value']}" if r["column"] else "all") == group}


REFERENCES = [f"the {w} sat on the mat near the door" for w in
              ("cat", "dog", "bird", "fox", "cow", "pig", "hen", "rat", "owl", "bee")] * 4


@pytest.fixture
def a_and_b(tmp_path):
    """40 utterances: A gets them all right, B one word wrong in 30 of them; two dialects."""
    ids = [f"u{i:02d}" for i in range(40)]
    refs = dict(zip(ids, REFERENCES, strict=True))
    groups = {u: {"dialect": ("north", "south")[i % 2]} for i, u in enumerate(ids)}
    a = make_run(tmp_path / "a", {u: (r, r.capitalize() + ".") for u, r in refs.items()}, groups)
    b = make_run(tmp_path / "b", {u: (r, r.replace("mat", "hat") if i < 30 else r)
                                  for i, (u, r) in enumerate(refs.items())}, groups)
    return a, b


def test_b_with_more_errors_loses_end_to_end_in_markdown_and_json(a_and_b, tmp_path):
    a, b = a_and_b
    done = tool(a, b, "--json", "--resamples", "500")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for name in ("as scored", "Whisper English", "basic", "registry (en)"):
        row = rows_of(report, name)["test"]
        assert (row["utterances"], row["WER_A"]) == (40, 0.0)
        assert row["WER_B"] == pytest.approx(100 * 30 / (40 * 9))  # 9 words each
        assert 0 < row["low"] < row["delta"] < row["high"] and row["p_a_better"] > 0.99
        assert row["verdict"] == "A better (CI excludes 0)"
    north = rows_of(report, "basic", "dialect=north")["test"]
    assert north["utterances"] == 20 and north["verdict"] == "A better (CI excludes 0)"

    out = tmp_path / "compare.md"
    swapped = tool(b, a, "--resamples", "500", "--out", out)
    assert swapped.returncode == 0, swapped.stderr
    assert out.read_text(encoding="utf-8").strip() == swapped.stdout.strip()
    line = next(x for x in swapped.stdout.splitlines() if x.startswith("| as scored | all |"))
    assert "| 40 | 8.33 | 0.00 | -8.33 |" in line and line.endswith("| B better (CI excludes 0) |")
    assert "Δ = WER B − WER A" in swapped.stdout


def test_the_same_seed_gives_the_same_table(a_and_b):
    first = compare_tool.markdown(compare_tool.compare(*a_and_b, resamples=200, seed=3))
    assert compare_tool.markdown(compare_tool.compare(*a_and_b, resamples=200, seed=3)) == first
    assert compare_tool.markdown(compare_tool.compare(*a_and_b, resamples=200, seed=4)) != first


def test_normaliser_columns_differ_where_they_should(tmp_path):
    """B writes "Mr. Smith's 2 cats" for "mister smith's two cats": no error after Whisper's
    English normaliser, two after the basic one (which keeps "mr" and "2")."""
    refs = {f"u{i}": "mister smith's two cats" for i in range(6)}
    a = make_run(tmp_path / "a", {u: (r, r) for u, r in refs.items()})
    b = make_run(tmp_path / "b", {u: (r, "Mr. Smith's 2 cats") for u, r in refs.items()})
    report = compare_tool.compare(a, b, resamples=200)
    whisper, basic = rows_of(report, "Whisper English")["test"], rows_of(report, "basic")["test"]
    assert (whisper["WER_A"], whisper["WER_B"], whisper["delta"]) == (0.0, 0.0, 0.0)
    assert whisper["verdict"] == "no significant difference" and whisper["p_a_better"] == 0.0
    assert (basic["WER_B"], basic["delta"]) == (50.0, 50.0)
    assert rows_of(report, "as scored")["test"]["WER_B"] == 50.0  # as the run scored it


def test_different_utterance_sets_are_compared_on_the_shared_ones(tmp_path):
    texts = {f"u{i}": ("one two three", "one two") for i in range(10)}
    a = make_run(tmp_path / "a", dict(list(texts.items())[:8]))
    b = make_run(tmp_path / "b", dict(list(texts.items())[3:]))
    report = compare_tool.compare(a, b, resamples=100)
    assert rows_of(report, "basic")["test"]["utterances"] == 5
    assert report["notes"]["test"][0] == ("5 utterances scored by both runs; left out: 3 of run "
                                         "A's, 2 of run B's (not scored by the other run).")
    c = make_run(tmp_path / "c", {"x1": ("a b", "a b"), "x2": ("c", "c")})
    refused = tool(a, c)
    assert refused.returncode != 0 and "no utterance in common" in refused.stderr


def test_a_run_without_hyps_file_is_compared_as_scored_only(a_and_b):
    a, b = a_and_b
    (b / "hyps_test.tsv").unlink()  # a run tested before the test stage wrote it
    report = compare_tool.compare(a, b, resamples=200)
    assert {(r["normalizer"], r["column"]) for r in report["rows"]} == {("as scored", "")}
    assert rows_of(report, "as scored")["test"]["verdict"] == "A better (CI excludes 0)"
    assert any(n.startswith("run B: no hyps_test.tsv") and "Only each run's own scoring" in n
               for n in report["notes"]["test"])
    (a / "hyps_test.tsv").write_text((a / "hyps_test.tsv").read_text().split("\nu01")[0] + "\n")
    report = compare_tool.compare(a, make_run(b, {"u00": ("x", "x"), "u01": ("y", "y")}))
    assert "run A: hyps_test.tsv holds other utterances than wer_test.txt" in str(report)


def test_unknown_split_and_untested_folder_are_named(a_and_b, tmp_path):
    done = tool(*a_and_b, "--split", "dev")
    assert done.returncode != 0 and "['dev'] not tested by both runs" in done.stderr
    done = tool(a_and_b[0], tmp_path)
    assert done.returncode != 0 and f"no wer_<split>.txt in {tmp_path}" in done.stderr


@pytest.fixture(scope="module")
def tested_ctc_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_subset(SYNTHETIC / "en", data / "en", {"train": 24, "valid": 6, "test": 6})
    out = tmp_path_factory.mktemp("run")
    exp = experiment(data, out, group_bootstrap_resamples=20)
    exp.fit()
    return out, data / "en" / "test.csv", exp.evaluate()["test"]


def test_a_ctc_test_run_writes_the_raw_texts_and_compare_reads_its_folder(tested_ctc_run):
    run, manifest, stats = tested_ctc_run
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = {r["ID"]: r for r in csv.DictReader(f)}
    language, texts, groups = read_hypotheses(run / "hyps_test.tsv")
    scored = read_alignments(run / "wer_test.txt")
    assert language == "en" and set(texts) == set(scored) == set(rows)
    for utt, (reference, hypothesis) in texts.items():
        assert reference == rows[utt]["wrd"]
        assert groups[utt] == {"gender": rows[utt]["gender"], "voice": rows[utt]["voice"]}
        # the raw CTC hypothesis is the scored one: the same edits against the reference
        edits, words = utterance_errors([reference.split()], [hypothesis.split()])
        assert (edits[0], words[0]) == scored[utt][:2]

    done = tool(run, run, "--resamples", "100", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert rows_of(report, "as scored")["test"]["WER_A"] == pytest.approx(stats["WER"])
    assert {r["column"] for r in report["rows"]} == {"", "gender", "voice"}
    assert all(r["delta"] == 0 and r["p_a_better"] in (0, None) and "A better" not in r["verdict"]
               for r in report["rows"])


class FixedSearch:
    """A stand-in for the Whisper test searcher: every utterance decodes to ``ids``."""

    def __init__(self, ids):
        self.ids = ids

    def set_lang_tokens(self, token):
        pass

    def __call__(self, enc, wav_lens):
        return [list(self.ids)] * enc.shape[0], None, None, None


def test_a_whisper_test_writes_the_decoded_text_before_its_scoring_normaliser(synthetic_subset,
                                                                            tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    hparams = load_yaml(WHISPER_YAML, {
        "data_folder": str(synthetic_subset), "output_folder": str(out),
        "tiny_config": MICRO_WHISPER, "max_batch_seconds": 8, "min_duration": 0.0})
    exp = build_experiment(hparams, {"device": "cpu"}, prepare_synthetic)
    tokenizer = exp.brain.tokenizer
    said = tokenizer.decode(tokenizer.encode(" Mr. Smith's 2 cats", add_special_tokens=False))
    exp.brain.test_search = FixedSearch(tokenizer.encode(said, add_special_tokens=False))
    exp.zero_shot()  # the test stage on the weights as loaded: no training needed
    _, texts, _ = read_hypotheses(out / "hyps_test_zero_shot.tsv")
    scored = read_alignments(out / "wer_test_zero_shot.txt")
    score = exp.brain.score_normalize  # Whisper's English normaliser
    assert texts and all(hypothesis == said for _, hypothesis in texts.values())
    assert score(said) == "mister smith is 2 cats" != said
    for utt, (reference, hypothesis) in texts.items():
        edits, words = utterance_errors([score(reference).split()], [score(hypothesis).split()])
        assert (edits[0], words[0]) == scored[utt][:2]
