"""The compiled CTC decoder (decoder_backend: flashlight, flashlight-text's beam search) against
SpeechBrain's searcher on the hand-made log-probs of the LM tests: same words, the same meaning
of alpha and beta, batched decoding, the lexicon, and the tuning grid in forked workers."""

import functools
import logging
import math
import os

import kenlm
import pytest
import torch
from test_ctc_decoding import LM_TEXT, TARGET, decode, log_probs_for, make_lm_setup

from speechtune import ctc_decoding as lm
from speechtune import lm_tuning
from speechtune.ngram import build_lm

ONE = torch.ones(1)


@pytest.fixture
def lm_setup(tmp_path):
    """The hand-made utterance, vocabulary, LM and hparams of test_ctc_decoding's LM tests."""
    return make_lm_setup(tmp_path)
# the hand-made utterance's acoustic preference for "cut" over "cat": log 0.5 - log 0.45
ACOUSTIC_GAP = math.log(0.5) - math.log(0.45)


def both(hparams, tokenizer, mode, alpha=0.0, beta=0.0):
    return {backend: lm.make_decoder({**hparams, "decoder_backend": backend}, tokenizer, mode,
                                     alpha, beta) for backend in lm.BACKENDS}


def flashlight(hparams, tokenizer, mode, alpha=0.0, beta=0.0, **options):
    """A flashlight decoder with the yaml's options and ``options`` on top."""
    options = {**lm.flashlight_options(hparams), **options}
    labels = lm.vocab_list(tokenizer)
    fl_lm = lm.FlashlightLM(lm.lm_file(hparams), labels, options["smearing"]) \
        if mode == "beam_lm" else None
    return lm.FlashlightDecoder(labels, 0, options, fl_lm, alpha, beta)


def test_greedy_beam_and_beam_lm_pick_the_same_words_as_speechbrain(lm_setup):
    hparams, tokenizer, utt = lm_setup
    lp = utt.log_probs.unsqueeze(0)
    # greedy: a one-hypothesis flashlight search is the best path, as ctc_greedy_decode's
    greedy = lm.GreedyDecoder(tokenizer, 0)
    one = flashlight(hparams, tokenizer, "beam", beam_size=1)
    assert one(lp, ONE) == greedy(lp, ONE) == [["the", "cut", "sat"]]
    # n-best: SpeechBrain's (what its pruning keeps) is the head of flashlight's, in order
    for mode, weights in [("beam", (0.0, 0.0)), ("beam_lm", (0.5, 1.0)), ("beam_lm", (1.0, 2.0))]:
        searcher = lm.make_searcher({**hparams, "ctc_searcher": functools.partial(
            hparams["ctc_searcher"], topk=4)}, tokenizer, mode, *weights)
        sb_nbest = [hyp.text.split() for hyp in searcher(lp, ONE)[0]]
        fl_nbest = flashlight(hparams, tokenizer, mode, *weights).nbest(lp, ONE, 4)[0]
        assert len(sb_nbest) >= 2 and fl_nbest[:len(sb_nbest)] == sb_nbest, (mode, weights)
    # the best words over a grid of weights, through the recipe's constructor
    for alpha in (0.0, 0.1, 0.5, 1.0, 2.0):
        for beta in (0.0, 1.0, 5.0):
            words = {backend: decode(d, utt) for backend, d in
                     both(hparams, tokenizer, "beam_lm", alpha, beta).items()}
            assert words["flashlight"] == words["speechbrain"], (alpha, beta, words)
            assert words["flashlight"] == (["the", "cut", "sat"] if alpha == 0 else
                                           TARGET.split())


def test_alpha_is_a_natural_log_weight_for_both_backends(lm_setup):
    """"cat" wins once alpha x (ln P(the cat sat) - ln P(the cut sat)) exceeds the acoustic
    gap: flashlight's log10 KenLM scores are weighted by alpha ln 10 (unconverted, the switch
    would come 2.3 times later)."""
    hparams, tokenizer, utt = lm_setup
    model = kenlm.Model(hparams["lm_path"])
    lm_gap = (model.score("the cat sat") - model.score("the cut sat")) * math.log(10)
    switch = ACOUSTIC_GAP / lm_gap
    for factor, expected in [(0.7, "cut"), (1.4, "cat")]:
        for backend, decoder in both(hparams, tokenizer, "beam_lm", factor * switch).items():
            assert decode(decoder, utt)[1] == expected, (backend, factor)


def test_flashlight_score_is_the_path_plus_alpha_ln_p_plus_beta_per_word(lm_setup):
    """With max (not log-add) merging, the best hypothesis scores its best path's log-prob +
    alpha x the natural-log LM probability of the sentence (</s> included) + beta per word; the
    last word is scored like the others although no separator follows it."""
    hparams, tokenizer, utt = lm_setup
    alpha, beta = 0.7, 1.5
    decoder = flashlight(hparams, tokenizer, "beam_lm", alpha, beta, log_add=False)
    lp = utt.log_probs.unsqueeze(0)
    emissions, lengths = decoder.emissions(lp, ONE)
    best = decoder.decoder.decode(emissions[0].data_ptr(), int(lengths[0]), emissions.shape[2])[0]
    assert decoder.words(best) == TARGET.split()
    # the target's best path: each frame's most probable label but "a" (0.45) for "u" (0.5)
    path = utt.log_probs.max(dim=-1).values.sum().item() - ACOUSTIC_GAP
    ln_p = kenlm.Model(hparams["lm_path"]).score(TARGET, bos=True, eos=True) * math.log(10)
    assert best.score == pytest.approx(path + alpha * ln_p + beta * 3, abs=1e-4)


@pytest.mark.parametrize("mode", ["beam", "beam_lm"])
def test_a_padded_batch_decodes_as_each_utterance_alone(lm_setup, mode):
    hparams, tokenizer, _ = lm_setup
    vocab = lm.vocab_list(tokenizer)
    texts = ["the dog sat on the mat", "we cut it", "the cat sat", "i cut the bread"]
    # the padding frames are log-prob 0 for every label: decoded, they would change the words
    utterances = [lm_tuning.Utterance(str(i), log_probs_for(t, vocab, 1, "u"), t.split())
                  for i, t in enumerate(texts)]
    decoder = both(hparams, tokenizer, mode, 0.5, 1.0)["flashlight"]
    log_probs, wav_lens = next(lm_tuning.batches(utterances, len(utterances)))
    assert log_probs.shape[0] == 4 and wav_lens.min() < 0.5
    alone = [decoder(u.log_probs.unsqueeze(0), ONE)[0] for u in utterances]
    assert decoder(log_probs, wav_lens) == alone
    assert alone[1] == (["we", "cut", "it"] if mode == "beam_lm" else ["wu", "cut", "it"])


def test_the_lexicon_is_the_lms_words_spelled_with_the_labels(lm_setup, tmp_path, caplog):
    hparams, tokenizer, _ = lm_setup
    labels = lm.vocab_list(tokenizer)
    arpa = tmp_path / "more.arpa"
    build_lm([t.split() for t in [*LM_TEXT, "the café sat"]], 3, [0], arpa)  # é: not a label
    with caplog.at_level(logging.WARNING, logger="speechtune.ctc_decoding"):
        fl_lm = lm.FlashlightLM(arpa, labels, "none")
    assert "1 of the 12 words" in caplog.text
    assert fl_lm.words == sorted({w for t in LM_TEXT for w in t.split()}) + ["<unk>"]
    # only lexicon words are written: "cot" is heard, a word of the LM is written instead
    decoder = lm.FlashlightDecoder(labels, 0, lm.flashlight_options(hparams), fl_lm, 0.5, 1.0)
    heard = log_probs_for("the cot sat", labels, 100, "o").unsqueeze(0)  # no confusion
    assert lm.GreedyDecoder(tokenizer, 0)(heard, ONE) == [["the", "cot", "sat"]]
    assert decoder(heard, ONE)[0] in (["the", "cat", "sat"], ["the", "cut", "sat"])
    with pytest.raises(ValueError, match="no word separator"):
        lm.FlashlightDecoder(["<blank>", "a"], 0, lm.flashlight_options(hparams))


class ForkedOnly:
    """A decoder that refuses to decode in the process that made it."""

    batch_size = 1

    def __init__(self, decoder):
        self.decoder, self.parent = decoder, os.getpid()

    def with_weights(self, alpha, beta):
        assert os.getpid() != self.parent, "a grid point was decoded in the parent process"
        return self.decoder.with_weights(alpha, beta)


@pytest.mark.parametrize("backend", lm.BACKENDS)
def test_grid_points_are_decoded_in_worker_processes_with_the_same_results(lm_setup, backend):
    hparams, tokenizer, utt = lm_setup
    decoder = both(hparams, tokenizer, "beam_lm")[backend]
    grid = ([0.0, 0.5, 1.0], [0.0, 2.0])
    serial = lm_tuning.grid_search(decoder, [utt] * 3, *grid, hparams["wer_computer"])
    forked = lm_tuning.grid_search(ForkedOnly(decoder), [utt] * 3, *grid,
                                   hparams["wer_computer"], num_workers=2)
    drop_speed = [{k: v for k, v in r.items() if k != "utt_per_s"} for r in serial]
    assert [{k: v for k, v in r.items() if k != "utt_per_s"} for r in forked] == drop_speed
    assert [r["WER"] for r in serial][:2] == [pytest.approx(100 / 3)] * 2  # alpha 0: "cut"
    assert serial[2]["WER"] == 0
    with pytest.raises(AssertionError, match="parent process"):  # the check itself works
        lm_tuning.grid_search(ForkedOnly(decoder), [utt], *grid, hparams["wer_computer"])
