"""n-gram LM building (ARPA, Kneser-Ney), CTC beam search with the LM (both backends), alpha/beta
tuning on valid, and what happens without the kenlm module. The two backends compared on the
same log-probs: test_flashlight_decoding.py."""

import json
import logging
import math
import os
import sys
from collections import Counter, defaultdict

import pytest
import torch
import yaml
from fakes import MICRO_ENCODER, REPO, SYNTHETIC, experiment
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.metric_stats import ErrorRateStats

from speechtune import ctc_decoding as lm
from speechtune import lm_tuning
from speechtune.data import build_char_vocab
from speechtune.ngram import (
    FALLBACK_DISCOUNTS,
    adjusted_counts,
    build_lm,
    check_prune,
    count_ngrams,
    discounts,
    read_sentences,
)
from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import load_yaml

YAML = REPO / "recipes" / "Synthetic" / "CTC" / "hparams" / "wavlm_tiny.yaml"


# ---------------------------------------------------------------------- ARPA
def read_arpa(path):
    """``{order: {ngram: (log10 p, log10 backoff)}}`` of an ARPA file (independent reader)."""
    grams, order = defaultdict(dict), 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1:].split("-")[0])
        elif order and line.strip() and not line.startswith("\\"):
            fields = line.split("\t")
            backoff = float(fields[2]) if len(fields) == 3 else 0.0
            grams[order][tuple(fields[1].split())] = (float(fields[0]), backoff)
    return grams


def arpa_log10(grams, context, word):
    """log10 p(word | context) by ARPA backoff."""
    gram = (*context, word)
    if not context and gram not in grams[1]:
        return grams[1][("<unk>",)][0]
    if gram in grams[len(gram)]:
        return grams[len(gram)][gram][0]
    backoff = grams[len(context)].get(context, (0.0, 0.0))[1] if context else 0.0
    return backoff + arpa_log10(grams, context[1:], word)


@pytest.fixture(scope="module")
def bundled_sentences():
    return read_sentences([SYNTHETIC / "en" / "train.csv"], "en")


def test_modified_kneser_ney_discounts_follow_chen_and_goodman():
    # counts of counts n1..n4 = 10, 4, 2, 1 (and two n-grams seen 7 times, which play no part):
    # Y = n1 / (n1 + 2 n2), D_i = i - (i + 1) Y n_{i+1} / n_i
    counts = [1] * 10 + [2] * 4 + [3] * 2 + [4] + [7] * 2
    adjusted = Counter({("w", str(i)): c for i, c in enumerate(counts)})
    y = 10 / (10 + 2 * 4)
    expected = (1 - 2 * y * 4 / 10, 2 - 3 * y * 2 / 4, 3 - 4 * y * 1 / 2)
    assert discounts(adjusted) == pytest.approx(expected)
    # the bundled text has every count of counts: its discounts are the closed-form ones
    for grams in adjusted_counts(count_ngrams(read_sentences(
            [SYNTHETIC / "en" / "train.csv"], "en"), 3)):
        assert discounts(grams) != FALLBACK_DISCOUNTS


def test_empty_text_names_the_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n ,.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        read_sentences([empty], "en")


@pytest.mark.parametrize("prune", [[0], [0, 0, 1]])
def test_arpa_of_the_bundled_text_sums_to_one_in_every_context(bundled_sentences, tmp_path,
                                                                prune):
    arpa = tmp_path / "lm.arpa"
    assert build_lm(bundled_sentences, 3, prune, arpa) == [arpa]  # no lmplz/build_binary here
    grams = read_arpa(arpa)
    assert sorted(grams) == [1, 2, 3] and len(grams[3]) > 100
    vocab = [w for (w,) in grams[1] if w != "<s>"]
    assert "</s>" in vocab and "<unk>" in vocab
    contexts = [(), *grams[1], *grams[2]]
    for context in contexts:
        if context[-1:] == ("</s>",):
            continue
        total = sum(10 ** arpa_log10(grams, context, w) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-5), context
    if prune != [0]:  # singleton trigrams dropped, every kept one seen at least twice
        counts = defaultdict(int)
        for words in bundled_sentences:
            tokens = ["<s>", *words, "</s>"]
            for i in range(len(tokens) - 2):
                counts[tuple(tokens[i:i + 3])] += 1
        assert all(counts[g] >= 2 for g in grams[3])
        assert len(grams[3]) < sum(1 for c in counts.values() if c >= 1)


def test_kenlm_reads_the_arpa_with_the_same_probabilities(bundled_sentences, tmp_path):
    import kenlm

    arpa = tmp_path / "lm.arpa"
    build_lm(bundled_sentences, 3, [0], arpa)
    grams, model = read_arpa(arpa), kenlm.Model(str(arpa))
    for sentence in ["the old man walks", "a zebra walks", "she is not here"]:
        words = sentence.split()
        ours = sum(arpa_log10(grams, tuple(["<s>", *words][max(0, i - 1):i + 1]), w)
                   for i, w in enumerate([*words, "</s>"]))
        assert model.score(sentence, bos=True, eos=True) == pytest.approx(ours, abs=1e-4)


def test_kneser_ney_uses_continuation_counts(tmp_path):
    """'francisco' is frequent but follows only 'san': as a unigram it is rarer than 'beach',
    seen as often after many words (what separates Kneser-Ney from absolute discounting)."""
    text = ["in san francisco"] * 6 + [f"{w} beach" for w in "a the one big red old".split()]
    build_lm([t.split() for t in text], 2, [0], tmp_path / "x.arpa")
    grams = read_arpa(tmp_path / "x.arpa")
    assert grams[1][("francisco",)][0] < grams[1][("beach",)][0]
    assert arpa_log10(grams, ("san",), "francisco") > math.log10(0.5)


def test_kenlm_tools_on_path_are_used(tmp_path, monkeypatch):
    """lmplz (given the text on stdin) and build_binary run when on PATH (stand-ins here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in {"lmplz": 'echo "$@" > "$ARGS"; cat > "${@: -1}"',
                       "build_binary": 'cp "$1" "$2"'}.items():
        (bin_dir / tool).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("ARGS", str(tmp_path / "args"))
    arpa = tmp_path / "lm.arpa"
    assert build_lm([["a", "b"], ["c"]], 3, [0, 0, 1], arpa) == [arpa, tmp_path / "lm.bin"]
    assert (tmp_path / "args").read_text().split() == [
        "-o", "3", "--discount_fallback", "--prune", "0", "0", "1", "--arpa", str(arpa)]
    assert arpa.read_text() == "a b\nc\n" and (tmp_path / "lm.bin").exists()


def test_read_sentences_normalises_manifests_and_text(tmp_path):
    (tmp_path / "a.txt").write_text("Hello, World!\n\n  Don't STOP.\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text("ID,wrd\n1,Æble og Øl.\n", encoding="utf-8")
    assert read_sentences([tmp_path / "a.txt"], "en") == [["hello", "world"], ["don't", "stop"]]
    assert read_sentences([tmp_path / "b.csv"], "da") == [["æble", "og", "øl"]]
    (tmp_path / "c.csv").write_text("ID,text\n1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'wrd' column"):
        read_sentences([tmp_path / "c.csv"], "en")


def test_order_and_prune_thresholds_are_checked():
    assert check_prune([0, 1], 4) == [0, 1, 1, 1]
    for bad in ([1, 1], [0, 2, 1]):
        with pytest.raises(ValueError, match="non-decreasing"):
            check_prune(bad, 3)
    with pytest.raises(ValueError, match="at least a bigram"):
        check_prune([0], 1)
    with pytest.raises(ValueError, match="3 values for an order-2"):
        check_prune([0, 0, 1], 2)


# ---------------------------------------------------------------------- decoding
LM_TEXT = ["the cat sat on the mat"] * 5 + ["i cut the bread", "we cut it", "the dog sat"]
TARGET = "the cat sat"


def log_probs_for(text, vocab, position, wrong):
    """Hand-made CTC log-probs: one frame per character (0.9), blanks between; at ``position``
    the label ``wrong`` gets 0.5 and the right character 0.45."""
    frames = []
    for i, ch in enumerate(text):
        probs = torch.full((len(vocab),), 0.1 / (len(vocab) - 1))
        if i == position:
            probs[:] = 0.05 / (len(vocab) - 2)
            probs[vocab.index(ch)], probs[vocab.index(wrong)] = 0.45, 0.5
        else:
            probs[vocab.index(ch)] = 0.9
        blank = torch.full((len(vocab),), 0.1 / (len(vocab) - 1))
        blank[0] = 0.9
        frames += [probs, blank]
    return torch.stack(frames).log()


@pytest.fixture
def lm_setup(tmp_path):
    """A vocabulary, an ARPA trigram of LM_TEXT and decoding hparams as the yaml has them."""
    return make_lm_setup(tmp_path)


def make_lm_setup(tmp_path):
    """``(hparams, tokenizer, utterance)``: the hand-made utterance of TARGET with its "a" heard
    as "u", the vocabulary of LM_TEXT, and the recipe's decoding hparams with a trigram of
    LM_TEXT as the LM (alpha 0.5, beta 1)."""
    arpa = tmp_path / "lm.arpa"
    build_lm([t.split() for t in LM_TEXT], 3, [0], arpa)
    tokenizer = build_char_vocab(LM_TEXT, tmp_path / "labels.txt")
    # the recipe's own searcher settings (loading the yaml builds no model)
    hparams = dict(load_yaml(YAML, {"output_folder": str(tmp_path / "run")}))
    hparams.update(decoding="beam_lm", lm_path=str(arpa), lm_weights="fixed", lm_alpha=0.5,
                   lm_beta=1.0, blank_index=0, output_folder=str(tmp_path / "run"),
                   wer_computer=ErrorRateStats, target_case="lower")
    vocab = lm.vocab_list(tokenizer)
    # the "a" of "cat" heard as "u": "cut" is a word the LM knows too, only its context rejects it
    utt = lm_tuning.Utterance("u1", log_probs_for(TARGET, vocab, 5, "u"), TARGET.split())
    return hparams, tokenizer, utt


def decode(decoder, utt):
    return decoder(utt.log_probs.unsqueeze(0), torch.ones(1))[0]


BACKEND_CLASSES = {"speechbrain": lm.SearchDecoder, "flashlight": lm.FlashlightDecoder}


@pytest.mark.parametrize("backend", lm.BACKENDS)
def test_lm_fixes_what_greedy_and_beam_get_wrong(lm_setup, backend):
    hparams, tokenizer, utt = lm_setup
    hparams["decoder_backend"] = backend
    greedy = lm.GreedyDecoder(tokenizer, 0)
    assert decode(greedy, utt) == ["the", "cut", "sat"]  # acoustically better, wrong
    beam = lm.make_decoder(hparams, tokenizer, "beam")
    assert type(beam) is BACKEND_CLASSES[backend]
    assert decode(beam, utt) == ["the", "cut", "sat"]
    decoder = lm.build_test_decoder(hparams, tokenizer)
    assert type(decoder) is BACKEND_CLASSES[backend]
    assert decode(decoder, utt) == ["the", "cat", "sat"]
    wers = [lm_tuning.decode_and_score(d, [utt], hparams["wer_computer"])[0]
            for d in (greedy, decoder)]
    assert wers[1] < wers[0]


@pytest.mark.parametrize("backend", lm.BACKENDS)
def test_tuning_writes_its_table_and_test_decoding_reads_it(lm_setup, caplog, backend):
    hparams, tokenizer, utt = lm_setup
    hparams["decoder_backend"] = backend
    decoder = lm.make_decoder(hparams, tokenizer, "beam_lm")
    rows = lm_tuning.grid_search(decoder, [utt], [0.0, 0.5, 1.0], [0.0, 1.0],
                                 hparams["wer_computer"])
    assert [(r["alpha"], r["beta"]) for r in rows][:3] == [(0.0, 0.0), (0.0, 1.0), (0.5, 0.0)]
    assert rows[0]["WER"] > 0  # without LM weight the wrong word wins
    best = lm_tuning.best_row(rows)
    assert best["WER"] == 0 and best["alpha"] > 0
    folder = lm.tuned_weights_path(hparams).parent
    lm_tuning.write_tuning(folder, rows, best, {"lm_path": hparams["lm_path"],
                                                "checkpoint": "CKPT+x", "greedy_WER": 33.3,
                                                "decoder_backend": backend})
    table = (folder / "grid.md").read_text()
    assert "| alpha \\ beta | 0 | 1 |" in table and "**0.00**" in table
    assert (folder / "grid.csv").read_text().count("\n") == 7
    assert lm.lm_weights({**hparams, "lm_weights": "tuned"}) == (best["alpha"], best["beta"])
    # tuned on one checkpoint, testing another (training went on): a warning naming both
    checkpointer = Checkpointer(folder.parent / "save")
    checkpointer.save_checkpoint(meta={"WER": 50.0}, name="newer")
    with caplog.at_level(logging.WARNING, logger="speechtune.ctc_decoding"):
        lm.lm_weights({**hparams, "lm_weights": "tuned", "checkpointer": checkpointer})
    assert "tuned on checkpoint CKPT+x, but the best-WER checkpoint is now CKPT+newer" in (
        caplog.text)
    assert "decoder_backend" not in caplog.text
    # weights tuned with the other backend: same units, but each search has its own best point
    other_backend = next(b for b in lm.BACKENDS if b != backend)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="speechtune.ctc_decoding"):
        assert lm.lm_weights({**hparams, "lm_weights": "tuned",
                              "decoder_backend": other_backend}) == (best["alpha"], best["beta"])
    assert f"tuned with decoder_backend: {backend}, but this run decodes with {other_backend}" \
        in caplog.text
    other = folder.parent / "other.arpa"
    other.write_text((folder.parent.parent / "lm.arpa").read_text())
    with pytest.raises(ValueError, match="tune_lm.py again"):
        lm.lm_weights({**hparams, "lm_weights": "tuned", "lm_path": str(other)})


def test_bad_decoding_keys_are_errors_naming_the_fix(lm_setup, tmp_path):
    hparams, _, _ = lm_setup
    with pytest.raises(ValueError, match="decoding: 'beem' is not one of greedy"):
        lm.check_decoding({**hparams, "decoding": "beem"})
    with pytest.raises(FileNotFoundError, match="tune_lm.py"):
        lm.check_decoding({**hparams, "lm_weights": "tuned"})
    with pytest.raises(ValueError, match="--lm_path"):
        lm.check_decoding({**hparams, "lm_path": None})
    binary = tmp_path / "only.bin"
    binary.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="only.arpa"):
        lm.check_decoding({**hparams, "lm_path": str(binary)})
    with pytest.raises(ValueError, match="decoder_backend: 'kenlm' is not one of flashlight"):
        lm.check_decoding({**hparams, "decoder_backend": "kenlm"})
    options = hparams["flashlight_decoder"]
    with pytest.raises(ValueError, match=r"flashlight_decoder: \['beam'\] not among its options"):
        lm.check_decoding({**hparams, "flashlight_decoder": {**options, "beam": 8}})
    with pytest.raises(ValueError, match=r"\['smearing'\] missing from its options"):
        lm.check_decoding({**hparams, "flashlight_decoder": {
            k: v for k, v in options.items() if k != "smearing"}})
    with pytest.raises(ValueError, match=r"smearing .min. is not one of none \| max \| logadd"):
        lm.check_decoding({**hparams, "flashlight_decoder": {**options, "smearing": "min"}})


def test_an_lm_in_the_other_case_than_the_targets_is_refused(lm_setup, tmp_path):
    """wav2vec2-large-960h's targets are upper case (target_case: upper): a lower-case LM would
    know none of their words and silently stop helping."""
    hparams, _, _ = lm_setup
    with pytest.raises(ValueError, match=r"not upper case.*build_lm.py \.\.\. --case upper"):
        lm.check_decoding({**hparams, "target_case": "upper"})
    upper = tmp_path / "upper.arpa"
    build_lm([t.upper().split() for t in LM_TEXT], 3, [0], upper)
    assert lm.check_decoding({**hparams, "target_case": "upper", "lm_path": str(upper)}) == \
        "beam_lm"


@pytest.mark.parametrize("backend", lm.BACKENDS)
def test_missing_kenlm_is_an_error_or_falls_back_to_beam_as_the_yaml_says(lm_setup, monkeypatch,
                                                                          backend):
    hparams, tokenizer, utt = lm_setup
    hparams["decoder_backend"] = backend
    # `import kenlm` now raises ImportError, and so does SpeechBrain's ARPA reader, which
    # imports it (the check must come first even when that module was imported before)
    monkeypatch.setitem(sys.modules, "kenlm", None)
    monkeypatch.setitem(sys.modules, "speechbrain.integrations.decoders.kenlm_scorer", None)
    with pytest.raises(ImportError, match=r"'kenlm'.*pip install -e '\.\[lm\]'.*--decoding=beam"):
        lm.check_decoding(hparams)
    fallback = {**hparams, "lm_missing": "fallback"}
    assert lm.check_decoding(fallback) == "beam"
    decoder = lm.build_test_decoder(fallback, tokenizer)
    assert type(decoder) is BACKEND_CLASSES[backend]
    assert decode(decoder, utt) == ["the", "cut", "sat"]


def test_missing_flashlight_names_the_package_and_the_other_backend(lm_setup, monkeypatch):
    hparams, _, _ = lm_setup
    monkeypatch.setitem(sys.modules, "flashlight.lib.text.decoder.kenlm", None)
    for mode in ("beam", "beam_lm"):
        with pytest.raises(ImportError, match=r"flashlight-text.*pip install -e '\.\[lm\]'.*"
                                              r"--decoder_backend=speechbrain"):
            lm.check_decoding({**hparams, "decoding": mode, "decoder_backend": "flashlight"})
    assert lm.check_decoding({**hparams, "decoder_backend": "speechbrain"}) == "beam_lm"
    assert lm.check_decoding({**hparams, "decoding": "greedy"}) == "greedy"


# ---------------------------------------------------------------------- through the recipe
def test_recipe_tests_with_beam_lm_and_tune_lm_tunes_from_the_best_checkpoint(
        synthetic_subset, tmp_path):
    arpa = tmp_path / "lm.arpa"
    build_lm(read_sentences([synthetic_subset / "en" / "train.csv"], "en"), 3, [0], arpa)
    out = tmp_path / "run"
    small = {"lm_alpha_grid": [0.0, 0.5], "lm_beta_grid": [0.0], "flashlight_decoder": {
        "beam_size": 8}, "lm_path": str(arpa)}
    exp = experiment(synthetic_subset, out, **small)
    exp.fit()
    argv = [str(YAML), f"--data_folder={synthetic_subset}", f"--output_folder={out}",
            "--model=tiny:wavlm", f"--tiny_config={json.dumps(MICRO_ENCODER)}",
            "--augmenter=null", "--min_duration=0.0", "--device=cpu",
            *[f"--{k}={json.dumps(v)}" for k, v in small.items()]]
    best = lm_tuning.tune(argv, prepare_synthetic)
    tuned = yaml.safe_load((out / "lm_tuning" / "lm_weights.yaml").read_text())
    assert (tuned["alpha"], tuned["beta"]) == (best["alpha"], best["beta"])
    best_ckpt = exp.brain.checkpointer.find_checkpoint(min_key="WER")
    assert tuned["checkpoint"] == best_ckpt.path.name
    table = (out / "lm_tuning" / "grid.md").read_text()
    assert "\n| 0 | " in table and "\n| 0.5 | " in table  # one row per alpha
    assert tuned["decoder_backend"] == "flashlight"  # the yaml's default
    again = experiment(synthetic_subset, out, decoding="beam_lm", **small)
    stats = again.evaluate()["test"]
    decoder = again.brain.test_decoder
    assert type(decoder) is lm.FlashlightDecoder and decoder.lm is not None
    assert (decoder.alpha, decoder.beta) == (best["alpha"], best["beta"])
    assert stats["WER"] is not None and (out / "wer_test.txt").exists()
