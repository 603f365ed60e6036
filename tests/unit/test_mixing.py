"""Corpus mixing (speechtune.mixing): the draws follow the weights, are reproducible per seed
and epoch and differ across epochs, batch like one corpus (fixed size or duration budget) with a
fixed number of batches per epoch (DDP's wrapper), keep each corpus's valid and test apart, and
refuse bad corpora lists by name."""

import csv
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from fakes import SYNTHETIC, write_subset
from speechbrain.dataio.sampler import DistributedSamplerWrapper
from speechbrain.utils.metric_stats import ErrorRateStats

from speechtune import mixing
from speechtune.data import Manifests, read_manifest
from speechtune.metrics import group_rows
from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.whisper_models import prefix_languages, prefix_normalized, prefix_search

SIZES = {"a": 50, "b": 10, "c": 200}
CORPUS_OF = [name for name, n in SIZES.items() for _ in range(n)]
# durations 0.5 .. 9.5 s, cycling, so duration buckets hold every corpus
DURATIONS = [0.5 + (i * 7) % 10 for i in range(len(CORPUS_OF))]
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


def sampler(seed=7, n=2000, **batching):
    batching = batching or {"batch_size": 8}
    return mixing.MixtureBatchSampler(CORPUS_OF, DURATIONS, WEIGHTS, n, seed, **batching)


def corpus_counts(s):
    return Counter(CORPUS_OF[i] for i in s.epoch_draws())


def test_the_draws_follow_the_weights_within_binomial_tolerance():
    s = sampler()
    for epoch in (1, 2):
        s.set_epoch(epoch)
        counts = corpus_counts(s)
        assert sum(counts.values()) == 2000
        for name, weight in WEIGHTS.items():  # 4 standard deviations of Binomial(N, w)
            assert abs(counts[name] - 2000 * weight) < 4 * math.sqrt(2000 * weight * (1 - weight))


def test_weights_are_relative():
    a = mixing.MixtureBatchSampler(CORPUS_OF, DURATIONS, {"a": 5, "b": 3, "c": 2}, 500, 3,
                                   batch_size=8)
    b = mixing.MixtureBatchSampler(CORPUS_OF, DURATIONS, WEIGHTS, 500, 3, batch_size=8)
    assert list(a) == list(b)


def test_an_upweighted_small_corpus_repeats_evenly():
    """Corpus b (10 utterances) is drawn about 600 times: each of its utterances 59-61 times,
    never twice before all of it has been drawn once."""
    s = sampler()
    s.set_epoch(1)
    per_utterance = Counter(i for i in s.epoch_draws() if CORPUS_OF[i] == "b")
    assert len(per_utterance) == 10
    assert max(per_utterance.values()) - min(per_utterance.values()) <= 1


def test_reproducible_per_seed_and_epoch_and_different_across_epochs():
    first, again, other_seed = sampler(), sampler(), sampler(seed=8)
    for s in (first, again, other_seed):
        s.set_epoch(3)
    assert list(first) == list(again)
    assert list(first) != list(other_seed)
    epoch_3 = list(first)
    first.set_epoch(4)
    assert list(first) != epoch_3
    first.set_epoch(3)  # a resumed run redraws the epoch it stopped in
    assert list(first) == epoch_3


def test_duration_budget_batches_keep_one_number_of_batches_per_epoch():
    s = sampler(n=600, max_batch_seconds=20, num_buckets=5, max_batch_ex=16)
    length = len(s)
    for epoch in range(1, 6):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == length
        assert all(sum(DURATIONS[i] for i in b) <= 20 and len(b) <= 16 for b in batches)
        counts = corpus_counts(s)  # the first `length` shuffled batches: about N draws
        assert abs(sum(counts.values()) - 600) < 120
        assert counts["a"] > counts["b"] > 0 and counts["a"] > counts["c"]


def test_ddp_splits_every_epoch_into_equal_disjoint_shares():
    """SpeechBrain wraps a batch sampler in DistributedSamplerWrapper under DDP: it sizes the
    shares once, so every epoch must have the same number of batches."""
    shares = {}
    for rank in (0, 1):
        s = sampler(n=600, max_batch_seconds=20, num_buckets=5, max_batch_ex=16)
        wrapper = DistributedSamplerWrapper(s, num_replicas=2, rank=rank, shuffle=True)
        for epoch in (1, 2, 3):
            wrapper.set_epoch(epoch)
            shares[rank, epoch] = list(wrapper)
    for epoch in (1, 2, 3):
        assert len(shares[0, epoch]) == len(shares[1, epoch]) > 0
        whole = sampler(n=600, max_batch_seconds=20, num_buckets=5, max_batch_ex=16)
        whole.set_epoch(epoch)
        together = sorted(map(tuple, shares[0, epoch] + shares[1, epoch]))
        assert set(together) <= set(map(tuple, whole))


# ---------------------------------------------------------------------------- corpora lists
def hparams(tmp_path, corpora, **more):
    return {"corpora": corpora, "replay_fraction": 0.0, "language": "da",
            "data_folder": str(tmp_path / "data"), "extra_tests": [],
            "output_folder": str(tmp_path / "out"), "mix_epoch_utterances": None, **more}


@pytest.fixture
def two_corpora(tmp_path):
    """Danish and English subsets of the bundled corpus; the English train manifest reuses the
    Danish IDs (two corpora numbering their utterances alike)."""
    data = tmp_path / "data"
    write_subset(SYNTHETIC / "da", data / "da", {"train": 8, "valid": 4, "test": 4})
    write_subset(SYNTHETIC / "en", data / "en", {"train": 8, "valid": 4, "test": 6})
    da_ids = list(read_manifest(data / "da" / "train.csv", data))
    with open(data / "en" / "train.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row, utt in zip(rows, da_ids, strict=True):
        row["ID"] = utt
    with open(data / "en" / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return hparams(tmp_path, {"da": {"weight": 0.7}, "en": {"weight": 0.3, "language": "en"}})


def test_merged_manifests_keep_each_corpus_valid_and_test_apart(two_corpora, tmp_path):
    prepare = mixing.preparation(two_corpora, prepare_synthetic)
    manifests = prepare(two_corpora)
    root = two_corpora["data_folder"]
    train = read_manifest(manifests.train, root)
    assert len(train) == 16  # same IDs in both corpora: prefixed, none lost
    assert Counter(r["corpus"] for r in train.values()) == {"da": 8, "en": 8}
    assert all(utt.startswith(f"{r['corpus']}-") for utt, r in train.items())
    assert {r["utt_language"] for r in train.values() if r["corpus"] == "en"} == {"en"}
    assert all("$data_root" not in r["wav"] and r["wav"].startswith(str(SYNTHETIC))
               for r in train.values())
    valid = read_manifest(manifests.valid, root)
    assert Counter(r["corpus"] for r in valid.values()) == {"da": 4, "en": 4}  # pooled
    assert set(manifests.tests) == {"test_da", "test_en"}
    assert manifests.languages == {"test_da": "da", "test_en": "en"}
    for name, n in (("da", 4), ("en", 6)):
        rows = read_manifest(manifests.tests[f"test_{name}"], root)
        assert len(rows) == n and {r["corpus"] for r in rows.values()} == {name}
    # the second call (every process) finds the same files and leaves them alone
    written = sorted((tmp_path / "out" / "mixture").glob("*.csv"))
    stamps = [p.stat().st_mtime_ns for p in written]
    assert prepare(two_corpora) == manifests
    assert [p.stat().st_mtime_ns for p in written] == stamps and len(written) == 4


def test_without_corpora_the_recipe_prepares_one_corpus(tmp_path):
    assert mixing.preparation(hparams(tmp_path, {}), prepare_synthetic) is prepare_synthetic
    with pytest.raises(ValueError, match=r"mixes corpora \(\['coral', 'cv'\]\).*corpora:"):
        mixing.preparation(hparams(tmp_path, {}), {"coral": print, "cv": print})


@pytest.mark.parametrize("weight", [0, -1, "0.7", True, float("inf"), None])
def test_a_weight_that_is_not_a_positive_number_is_named(tmp_path, weight):
    with pytest.raises(ValueError, match=r"corpora\.en\.weight: .* is not a positive number.*"
                                         r"remove its entry"):
        mixing.corpora(hparams(tmp_path, {"da": {"weight": 1}, "en": {"weight": weight}}),
                       prepare_synthetic)


@pytest.mark.parametrize("spec, message", [
    ({"weight": 1, "data_fodler": "x"}, r"corpora\.en: unknown key\(s\) \['data_fodler'\]"),
    ({"language": "en"}, r"corpora\.en: .*at least weight"),
    ({"weight": 1, "prepare": "coral"}, r"corpora\.en\.prepare: this recipe has one "
                                        r"preparation; remove the key"),
])
def test_a_bad_corpus_entry_is_named(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        mixing.corpora(hparams(tmp_path, {"da": {"weight": 1}, "en": spec}), prepare_synthetic)


def test_an_unknown_preparation_and_a_bad_name_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"corpora\.cv\.prepare: 'cv'; this recipe prepares "
                                         r"\['commonvoice', 'coral'\]"):
        mixing.corpora(hparams(tmp_path, {"cv": {"weight": 1, "prepare": "cv"}}),
                       {"coral": print, "commonvoice": print})
    with pytest.raises(ValueError, match=r"corpora\.cv-da: a corpus name is letters"):
        mixing.corpora(hparams(tmp_path, {"cv-da": {"weight": 1}}), prepare_synthetic)
    with pytest.raises(ValueError, match="replay_fraction: 0"):
        mixing.corpora(hparams(tmp_path, {"da": {"weight": 1}}, replay_fraction=0.2),
                       prepare_synthetic)


def test_an_empty_train_split_is_named(two_corpora, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("ID,duration,wav,spk_id,wrd\n", encoding="utf-8")

    def prepare(h):
        found = prepare_synthetic(h)
        return Manifests(str(empty), found.valid, found.tests) if h["language"] == "en" else found

    with pytest.raises(ValueError, match=r"corpora\.en: its train split \(.*empty\.csv\) holds "
                                         r"no utterances.*remove the corpus"):
        mixing.preparation(two_corpora, prepare)(two_corpora)


def test_a_corpus_left_without_training_utterances_is_named():
    with pytest.raises(ValueError, match=r"corpora \['b'\]: no training utterance left.*"
                                         r"min_duration/max_duration"):
        mixing.MixtureBatchSampler(["a", "a"], [1.0, 2.0], {"a": 1, "b": 1}, 10, 0,
                                   batch_size=2)
    with pytest.raises(ValueError, match="mix_epoch_utterances: 0"):
        mixing.MixtureBatchSampler(["a"], [1.0], {"a": 1}, 0, 0, batch_size=2)


def test_a_pooled_split_reports_one_row_per_corpus(two_corpora):
    """The merged rows' corpus column gives per-corpus WER rows (the runner passes every
    non-train split's rows as groups): each corpus's own WER, the pooled WER weighting them by
    their words."""
    manifests = mixing.preparation(two_corpora, prepare_synthetic)(two_corpora)
    valid = read_manifest(manifests.valid, two_corpora["data_folder"])
    stats = ErrorRateStats()
    for utt, row in valid.items():  # each Danish utterance with one substitution, English exact
        words = row["wrd"].split()
        hyp = (["x"] + words[1:]) if row["corpus"] == "da" else words
        stats.append([utt], [hyp], [words])
    groups = {utt: {"corpus": row["corpus"]} for utt, row in valid.items()}
    table = {r["value"]: r for r in group_rows(stats.scores, stats.scores, groups, resamples=10)}
    da_words = sum(len(r["wrd"].split()) for r in valid.values() if r["corpus"] == "da")
    assert set(table) == {"da", "en"}
    assert table["da"]["utterances"] == 4 and table["da"]["WER"] == pytest.approx(400 / da_words)
    assert table["en"]["WER"] == 0.0
    assert stats.summarize("error_rate") == pytest.approx(
        400 / (da_words + table["en"]["words"]))


def test_a_pooled_valid_batch_decodes_each_utterance_after_its_language_token():
    """A pooled valid batch of a Danish run holds English utterances too: the searcher gets each
    utterance's own language token (from its decoder prefix, once per beam) and the hypotheses
    are normalised in each utterance's language."""
    bos = torch.tensor([[50258, 50285, 50359], [50258, 50259, 50359]])  # <|da|>, <|en|>
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda ids: [
        {50285: "<|da|>", 50259: "<|en|>"}[i] for i in ids])

    class Searcher:
        def __init__(self, multilingual, **beam):
            self.model = SimpleNamespace(is_multilingual=multilingual)
            self.lang_tokens = None
            self.__dict__.update(beam)

        def set_lang_tokens(self, tokens):
            self.lang_tokens = tokens

        def __call__(self, enc, wav_lens):
            return ["hyps"], None, None, None

    greedy, beam, english_only = Searcher(True), Searcher(True, beam_size=3), Searcher(False)
    assert prefix_search(greedy, None, None, bos) == ["hyps"]
    assert greedy.lang_tokens.tolist() == [50285, 50259]
    prefix_search(beam, None, None, bos)
    assert beam.lang_tokens.tolist() == [50285] * 3 + [50259] * 3
    prefix_search(english_only, None, None, bos)
    assert english_only.lang_tokens is None
    assert prefix_languages(bos, greedy, tokenizer) == ["da", "en"]
    brain = SimpleNamespace(valid_search=greedy, tokenizer=tokenizer, score_normalize=str.upper,
                            score_normalizers={"da": str.lower, "en": str.title})
    assert prefix_normalized(brain, ["Et Hus", "a house"], bos) == [["et", "hus"], ["A", "House"]]
    brain.valid_search = english_only
    assert prefix_normalized(brain, ["Et Hus", "a house"], bos) == [["ET", "HUS"], ["A", "HOUSE"]]
