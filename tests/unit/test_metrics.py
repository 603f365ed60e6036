"""Per-group WER/CER with seeded bootstrap intervals and the table a test run writes; the paired
bootstrap of two systems; the per-utterance test files."""

import csv
import math

import numpy as np
import pytest
from fakes import experiment

from speechtune.metrics import (
    bootstrap_interval,
    group_rows,
    markdown,
    paired_bootstrap,
    read_alignments,
    read_hypotheses,
    utterance_errors,
    write_test_files,
)
from speechtune.text import basic_normalize


def scores(edits_and_totals, prefix="u"):
    return [{"key": f"{prefix}{i}", "num_edits": e, "num_ref_tokens": t}
            for i, (e, t) in enumerate(edits_and_totals)]


def test_group_wer_is_pooled_per_value_with_counts():
    wer = scores([(1, 4), (0, 6), (3, 5), (5, 5)])
    cer = scores([(2, 20), (0, 30), (6, 25), (20, 25)])
    groups = {"u0": {"dialect": "north", "gender": "f"}, "u1": {"dialect": "north", "gender": "m"},
              "u2": {"dialect": "south", "gender": "f"}, "u3": {"dialect": "south", "gender": "m"}}
    rows = {(r["column"], r["value"]): r for r in group_rows(wer, cer, groups, resamples=200)}
    north, south = rows[("dialect", "north")], rows[("dialect", "south")]
    assert (north["utterances"], north["words"]) == (2, 10)
    assert north["WER"] == pytest.approx(10.0) and south["WER"] == pytest.approx(80.0)
    assert north["CER"] == pytest.approx(4.0)
    assert rows[("gender", "m")]["WER"] == pytest.approx(100 * 5 / 11)
    table = markdown(list(rows.values()), "test", 200)
    assert "| dialect | north | 2 | 10 | 10.00 |" in table


def test_bootstrap_interval_holds_the_estimate_narrows_with_size_and_is_seeded():
    rng = np.random.default_rng(1)
    widths = []
    for n in (10, 40, 400):
        totals = rng.integers(3, 12, size=n)
        edits = rng.binomial(totals, 0.2)
        point = 100 * edits.sum() / totals.sum()
        low, high = bootstrap_interval(edits, totals, resamples=1000, seed=0)
        assert low <= point <= high
        widths.append(high - low)
        assert bootstrap_interval(edits, totals, 1000, 0) == (low, high)  # same seed, same CI
    assert widths[0] > widths[1] > widths[2]
    assert all(math.isnan(x) for x in bootstrap_interval([1], [5], 1000, 0))  # one utterance


def test_a_test_run_writes_the_per_group_table_of_the_bundled_columns(synthetic_subset,
                                                                       tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", group_bootstrap_resamples=50)
    exp.fit()
    exp.evaluate()
    with open(tmp_path / "run" / "wer_test_groups.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(synthetic_subset / "en" / "test.csv", newline="", encoding="utf-8") as f:
        manifest = list(csv.DictReader(f))
    for column in ("voice", "gender"):  # every value of each bundled group column, all counted
        mine = {r["value"]: int(r["utterances"]) for r in rows if r["column"] == column}
        assert mine == {v: sum(m[column] == v for m in manifest) for v in mine}
        assert sum(mine.values()) == len(manifest)
    assert "95% bootstrap" in (tmp_path / "run" / "wer_test_groups.md").read_text()


def test_unknown_group_column_is_named(synthetic_subset, tmp_path):
    with pytest.raises(ValueError, match=r"group_columns: \['dialect'\] not in the manifests"):
        experiment(synthetic_subset, tmp_path / "run", group_columns=["dialect"])


# ---------------------------------------------------------------------- paired bootstrap
def test_a_system_against_itself_differs_by_exactly_zero_in_every_draw():
    rng = np.random.default_rng(3)
    words = rng.integers(3, 15, size=50)
    edits = rng.binomial(words, 0.3)
    result = paired_bootstrap((edits, words), (edits, words), resamples=500, seed=1)
    assert result["delta"] == 0.0 and result["WER_A"] == result["WER_B"]
    assert (result["low"], result["high"]) == (0.0, 0.0)
    assert result["p_tie"] == 1.0  # every draw: the same WER for both
    assert result["p_a_better"] == 0.0  # a tie is no win


def test_the_system_with_more_errors_loses_with_an_interval_that_excludes_zero():
    rng = np.random.default_rng(4)
    words = rng.integers(5, 20, size=60)
    edits_a = rng.binomial(words, 0.15)
    edits_b = edits_a + (rng.random(60) < 0.8)  # one more error on most utterances
    result = paired_bootstrap((edits_a, words), (edits_b, words), resamples=1000, seed=0)
    assert result["delta"] == pytest.approx(100 * (edits_b.sum() - edits_a.sum()) / words.sum())
    assert 0 < result["low"] <= result["delta"] <= result["high"]
    assert result["p_a_better"] > 0.99
    swapped = paired_bootstrap((edits_b, words), (edits_a, words), resamples=1000, seed=0)
    assert swapped["high"] < 0 and swapped["p_a_better"] < 0.01
    assert swapped["delta"] == pytest.approx(-result["delta"])
    again = paired_bootstrap((edits_a, words), (edits_b, words), resamples=1000, seed=0)
    assert again == result  # seeded: the same draws


def test_pairing_finds_a_difference_that_unpaired_intervals_cannot():
    """Utterances of very different difficulty: each system's own interval is wide and the two
    overlap, but B's extra error on 40% of the utterances is a consistent, paired shift."""
    rng = np.random.default_rng(5)
    words = np.full(50, 10)
    edits_a = rng.integers(0, 9, size=50)  # 0 to 80% WER per utterance
    edits_b = edits_a + (np.arange(50) % 5 < 2)
    low_a, high_a = bootstrap_interval(edits_a, words, 1000, seed=0)
    low_b, high_b = bootstrap_interval(edits_b, words, 1000, seed=0)
    assert low_b < high_a  # the unpaired intervals overlap
    paired = paired_bootstrap((edits_a, words), (edits_b, words), resamples=1000, seed=0)
    assert paired["low"] > 0 and paired["p_a_better"] > 0.99


def test_one_utterance_gets_no_interval():
    result = paired_bootstrap(([1], [4]), ([2], [4]), resamples=100, seed=0)
    assert result["delta"] == 25.0 and result["utterances"] == 1
    assert all(math.isnan(result[k]) for k in ("low", "high", "p_a_better", "p_tie"))


def test_utterance_errors_count_edits_and_reference_words():
    edits, words = utterance_errors([["mister", "smith's", "two", "cats"], []],
                                    [["mr", "smith's", "2", "cats"], ["uh"]])
    assert edits.tolist() == [2, 1] and words.tolist() == [4, 0]


def test_test_files_round_trip_raw_texts_groups_and_alignment_counts(tmp_path):
    """write_test_files (what the test stage calls) and the readers tools/compare.py uses:
    tabs, quotes and line breaks in raw texts survive; the counts are ErrorRateStats'."""
    from types import SimpleNamespace

    from speechbrain.utils.metric_stats import ErrorRateStats

    texts = {"u2": ('He said "hi"\tthere.', "he said hi there"),
             "u1": ("Two\nlines, Mr. X", "two lines mister x x")}
    wer = ErrorRateStats()
    for utt, (ref, hyp) in texts.items():
        wer.append([utt], [basic_normalize(hyp).split()], [basic_normalize(ref).split()])
    brain = SimpleNamespace(
        hparams=SimpleNamespace(output_folder=str(tmp_path), language="en"),
        test_name="test_zero_shot", test_split="test", wer_metric=wer, hypotheses=texts,
        split_languages={"test": "da"},
        groups={"test": {"u1": {"dialect": "fynsk", "gender": "f"}, "u2": {"dialect": "x"}}})
    write_test_files(brain)
    language, read, groups = read_hypotheses(tmp_path / "hyps_test_zero_shot.tsv")
    assert language == "da" and read == texts
    assert groups == {"u1": {"dialect": "fynsk", "gender": "f"},
                      "u2": {"dialect": "x", "gender": ""}}
    rows = (tmp_path / "hyps_test_zero_shot.tsv").read_text(encoding="utf-8")
    assert rows.index("u1\t") < rows.index("u2\t")  # by ID
    counts = read_alignments(tmp_path / "wer_test_zero_shot.txt")
    assert counts == {s["key"]: (s["num_edits"], s["num_ref_tokens"], tuple(s["ref_tokens"]))
                      for s in wer.scores}
    assert counts["u1"] == (2, 4, ("two", "lines", "mr", "x"))  # mr -> mister, + x
    assert not list(tmp_path.glob("*.tmp"))
