"""Per-group WER/CER with seeded bootstrap intervals, and the table a test run writes."""

import csv
import math

import numpy as np
import pytest
from fakes import experiment

from speechtune.metrics import bootstrap_interval, group_rows, markdown


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
