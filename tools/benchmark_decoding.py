#!/usr/bin/env python3
"""CTC beam search speed and WER: the compiled decoder (decoder_backend: flashlight,
flashlight-text) beside SpeechBrain's searcher, on the same log-probs, in one process.

``test``: a finished CTC run of the bundled corpus (the recipe's yaml and training overrides after
``--``, run from ``recipes/Synthetic/CTC``). Its best-WER checkpoint's valid and test log-probs are
computed once; with ``--tune`` each backend's LM weights are grid-searched on valid
(``lm_alpha_grid`` x ``lm_beta_grid``, ``--workers`` processes), else both use the yaml's
(``lm_weights``). The test log-probs are then decoded greedily, by beam search and by beam
search + LM with each backend, timing the decoding only. ``--variant NAME='{"key": value}'``
adds flashlight with other ``flashlight_decoder`` options (tuned the same way):

    cd recipes/Synthetic/CTC
    python ../../../tools/benchmark_decoding.py test --lm results/lm/en_3gram.arpa --tune \\
        -- hparams/wavlm_tiny.yaml --number_of_epochs=6 --output_folder=results/en_6ep

``grid``: the timing of ``tune_lm.py``'s grid on ``--utterances`` synthetic log-probs of
LibriSpeech-like length (no model): durations drawn from normal(12.7 s, 3.5 s) within 1-24.5 s
(LibriSpeech train-clean-100's; its dev and test sets average about 7 s), 50 frames a second
(WavLM, wav2vec2, Whisper's encoder), 15 characters a second of bundled English sentences, each
character a peak of 1-2 frames between blanks; ``--confusions`` of the characters are heard as
another one, more probable than the right one. The grid is hparams/ctc.yaml's (6 x 5 = 30 points),
decoded with flashlight and the LM by ``speechtune.lm_tuning.grid_search``; SpeechBrain's
searcher decodes ``--speechbrain_sample`` of the utterances at one point for comparison:

    python tools/benchmark_decoding.py grid --lm recipes/Synthetic/CTC/results/lm/en_3gram.arpa \\
        --utterances 2700 --workers 2

Both print Markdown tables; ``--out F`` also appends the results as one JSON line.
"""

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
from speechbrain.utils.metric_stats import ErrorRateStats

from speechtune import ctc_decoding, lm_tuning
from speechtune.data import build_char_vocab
from speechtune.ngram import read_sentences
from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import load_yaml

REPO = Path(__file__).resolve().parents[1]
CTC_YAML = REPO / "recipes" / "Synthetic" / "CTC" / "hparams" / "wavlm_tiny.yaml"
ENGLISH = REPO / "recipes" / "Synthetic" / "data" / "en" / "train.csv"
LIBRISPEECH_LIKE = {"mean": 12.7, "sd": 3.5, "low": 1.0, "high": 24.5}  # seconds
FRAMES_PER_SECOND = 50
CHARS_PER_SECOND = 15


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed_score(decoder, utterances):
    wer, speed = lm_tuning.decode_and_score(decoder, utterances, ErrorRateStats)
    return {"WER": round(float(wer), 2), "utt_per_s": round(speed, 2)}


def tuned(decoder, utterances, hparams, workers):
    rows = lm_tuning.grid_search(decoder, utterances, hparams["lm_alpha_grid"],
                                 hparams["lm_beta_grid"], ErrorRateStats, workers)
    best = lm_tuning.best_row(rows)
    return best["alpha"], best["beta"], best["WER"]


# ---------------------------------------------------------------------------- test
def variant(text):
    name, _, options = text.partition("=")
    return name, json.loads(options)


def test(args):
    hparams, experiment, ckpt = lm_tuning.load_finished_run(
        [*args.recipe, f"--lm_path={args.lm}"], prepare_synthetic)
    brain = experiment.brain
    tokenizer = brain.tokenizer
    valid = lm_tuning.collect_log_probs(brain, experiment.valid, experiment.loader_kwargs["valid"])
    test_set = lm_tuning.collect_log_probs(brain, experiment.tests["test"],
                                           experiment.loader_kwargs["test"])
    by_backend = {b: {**hparams, "decoder_backend": b} for b in ctc_decoding.BACKENDS}
    for name, options in args.variant:
        by_backend[f"flashlight {name}"] = {**hparams, "decoder_backend": "flashlight",
                                            "flashlight_decoder": {
                                                **hparams["flashlight_decoder"], **options}}
    lm_decoders = {b: ctc_decoding.make_decoder(h, tokenizer, "beam_lm")
                   for b, h in by_backend.items()}
    weights = {}
    for backend, decoder in lm_decoders.items():
        if args.tune:
            start = time.perf_counter()
            alpha, beta, valid_wer = tuned(decoder, valid, hparams, args.workers)
            weights[backend] = (alpha, beta)
            print(f"{backend}: best valid WER {valid_wer:.2f}% at alpha {alpha:g}, beta {beta:g} "
                  f"({time.perf_counter() - start:.0f} s for the grid)", flush=True)
        else:
            weights[backend] = ctc_decoding.lm_weights(by_backend[backend])
    rows = [{"decoding": "greedy", "backend": "",
             **timed_score(ctc_decoding.GreedyDecoder(tokenizer, hparams["blank_index"]),
                           test_set)}]
    for backend, h in by_backend.items():
        rows.append({"decoding": "beam", "backend": backend, **timed_score(
            ctc_decoding.make_decoder(h, tokenizer, "beam"), test_set)})
    for backend, decoder in lm_decoders.items():
        # flashlight also at SpeechBrain's weights: the same units, another search
        for source in dict.fromkeys([backend, "speechbrain"]):
            alpha, beta = weights[source]
            rows.append({"decoding": f"beam_lm (alpha {alpha:g}, beta {beta:g}: {source}'s)",
                         "backend": backend,
                         **timed_score(decoder.with_weights(alpha, beta), test_set)})
    beam = hparams["flashlight_decoder"]["beam_size"], hparams["ctc_searcher"].keywords[
        "beam_size"]
    print(f"\ncheckpoint {ckpt.path.name}; LM {args.lm}; test: {len(test_set)} utterances; "
          f"beam size flashlight {beam[0]}, speechbrain {beam[1]}; {cpu_name()}, "
          f"{torch.get_num_threads()} torch threads\n")
    print("| decoding | backend | test WER | utt/s (decoding only) | flashlight / speechbrain |")
    print("|---|---|---|---|---|")
    sb_speed = {r["decoding"].split(" (")[0]: r["utt_per_s"] for r in rows
                if r["backend"] == "speechbrain"}
    for r in rows:
        base = sb_speed.get(r["decoding"].split(" (")[0])
        compiled = r["backend"].startswith("flashlight")
        ratio = f"{r['utt_per_s'] / base:.0f}x" if compiled and base else ""
        print(f"| {r['decoding']} | {r['backend']} | {r['WER']:.2f}% | {r['utt_per_s']:.1f} | "
              f"{ratio} |")
    return {"mode": "test", "checkpoint": ckpt.path.name, "lm": str(args.lm), "rows": rows,
            "weights": weights}


# ---------------------------------------------------------------------------- grid
def sentence_words(sentences, rng, budget):
    """Words of bundled sentences, drawn in order, up to ``budget`` characters in all."""
    words = []
    while True:
        for word in rng.choice(sentences):
            if len(" ".join([*words, word])) > budget:
                return words or [min((w for s in sentences for w in s), key=len)]
            words.append(word)


def synthetic_log_probs(sentences, labels, n, confusions, seed=0):
    """``n`` utterances of LibriSpeech-like length whose log-probs spell bundled sentences (see
    the module docstring), as ``lm_tuning.Utterance``s."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    letters = [i for i, lab in enumerate(labels) if len(lab) == 1 and lab != " "]
    utterances = []
    for u in range(n):
        seconds = min(max(rng.gauss(LIBRISPEECH_LIKE["mean"], LIBRISPEECH_LIKE["sd"]),
                          LIBRISPEECH_LIKE["low"]), LIBRISPEECH_LIKE["high"])
        frames = round(seconds * FRAMES_PER_SECOND)
        words = sentence_words(sentences, rng, min(seconds * CHARS_PER_SECOND, frames // 3))
        text = " ".join(words)
        frames = max(frames, 3 * len(text))
        span = frames // len(text)  # >= 3 frames per character
        truth = torch.zeros(frames, dtype=torch.long)  # blank but at each character's peak
        for i, char in enumerate(text):  # a peak of 1-2 frames, then at least one blank
            start = i * span + rng.randrange(span - 2)
            truth[start:start + rng.choice((1, 2))] = labels.index(char)
        rows = torch.arange(frames)
        right = torch.empty(frames).uniform_(0.6, 0.98, generator=gen)
        other = torch.tensor([rng.choice(letters) for _ in range(frames)])
        probs = torch.rand(frames, len(labels), generator=gen) * 1e-3  # a floor
        probs[rows, truth] += right
        probs[rows, other] += (1 - right) * 0.7  # a runner-up letter
        for frame in range(frames):
            if truth[frame] != 0 and rng.random() < confusions:  # heard as another letter
                probs[frame, truth[frame]], probs[frame, other[frame]] = 0.35, 0.55
        log_probs = (probs / probs.sum(dim=-1, keepdim=True)).log()
        utterances.append(lm_tuning.Utterance(f"synthetic{u}", log_probs, words))
    return utterances


def grid(args):
    hparams = dict(load_yaml(CTC_YAML, {"output_folder": str(args.workdir)}))
    hparams.update(lm_path=str(args.lm), decoder_backend="flashlight", target_case="lower")
    sentences = read_sentences([ENGLISH], "en")
    tokenizer = build_char_vocab([" ".join(s) for s in sentences],
                                 Path(args.workdir) / "labels.txt")
    labels = ctc_decoding.vocab_list(tokenizer)
    start = time.perf_counter()
    utterances = synthetic_log_probs(sentences, labels, args.utterances, args.confusions)
    made = time.perf_counter() - start
    frames = sum(len(u.log_probs) for u in utterances)
    greedy = timed_score(ctc_decoding.GreedyDecoder(tokenizer, 0), utterances)
    decoder = ctc_decoding.make_decoder(hparams, tokenizer, "beam_lm")
    start = time.perf_counter()
    rows = lm_tuning.grid_search(decoder, utterances, args.alpha_grid, args.beta_grid,
                                 ErrorRateStats, args.workers)
    seconds = time.perf_counter() - start
    best = lm_tuning.best_row(rows)
    result = {"mode": "grid", "utterances": len(utterances), "points": len(rows),
              "workers": args.workers, "grid_seconds": round(seconds, 1),
              "mean_seconds_audio": round(frames / len(utterances) / FRAMES_PER_SECOND, 2),
              "greedy_WER": greedy["WER"], "best": best,
              "flashlight_utt_per_s_per_worker": round(
                  sum(r["utt_per_s"] for r in rows) / len(rows), 1)}
    if args.speechbrain_sample:
        sample = utterances[:args.speechbrain_sample]
        sb_decoder = ctc_decoding.make_decoder({**hparams, "decoder_backend": "speechbrain"},
                                               tokenizer, "beam_lm", best["alpha"], best["beta"])
        result["speechbrain_sample"] = {"utterances": len(sample),
                                        **timed_score(sb_decoder, sample)}
        result["flashlight_sample"] = {"utterances": len(sample), **timed_score(
            decoder.with_weights(best["alpha"], best["beta"]), sample)}
    print(f"\n{len(utterances)} synthetic utterances (mean {result['mean_seconds_audio']} s, "
          f"{frames} frames, made in {made:.0f} s), {len(labels)} labels; LM {args.lm}; "
          f"{cpu_name()}; greedy WER {greedy['WER']:.2f}%\n")
    print("| grid | workers | wall time | utt/s per worker (mean over points) | best valid WER |")
    print("|---|---|---|---|---|")
    print(f"| {len(rows)} points x {len(utterances)} utt. | {args.workers} | {seconds:.0f} s | "
          f"{result['flashlight_utt_per_s_per_worker']} | {best['WER']:.2f}% (alpha "
          f"{best['alpha']:g}, beta {best['beta']:g}) |")
    if args.speechbrain_sample:
        fl, sb = result["flashlight_sample"], result["speechbrain_sample"]
        print(f"\nthe first {len(sample)} utterances at the best point, one process: flashlight "
              f"{fl['utt_per_s']} utt/s (WER {fl['WER']:.2f}%), speechbrain {sb['utt_per_s']} "
              f"utt/s (WER {sb['WER']:.2f}%): {fl['utt_per_s'] / sb['utt_per_s']:.0f}x")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("test", "grid"))
    parser.add_argument("--lm", required=True, help="ARPA file (local/build_lm.py)")
    parser.add_argument("--workers", type=int, default=2, help="grid processes (default 2)")
    parser.add_argument("--tune", action="store_true", help="test: tune each backend on valid")
    parser.add_argument("--variant", action="append", default=[], type=variant,
                        help="test: NAME=JSON, flashlight with these flashlight_decoder options")
    parser.add_argument("--utterances", type=int, default=2700, help="grid: how many")
    parser.add_argument("--confusions", type=float, default=0.08,
                        help="grid: share of characters heard as another (default 0.08)")
    parser.add_argument("--speechbrain_sample", type=int, default=10,
                        help="grid: utterances SpeechBrain's searcher decodes (0: none)")
    parser.add_argument("--alpha_grid", type=float, nargs="+",
                        default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5],
                        help="grid: LM weights (default: hparams/ctc.yaml's lm_alpha_grid)")
    parser.add_argument("--beta_grid", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0],
                        help="grid: word bonuses (default: hparams/ctc.yaml's lm_beta_grid)")
    parser.add_argument("--workdir", default="results/benchmark_decoding",
                        help="grid: folder for the vocabulary file")
    parser.add_argument("--out", help="append the results to this JSON lines file")
    own = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    args = parser.parse_args(own)
    args.recipe = sys.argv[len(own) + 2:]  # after --: the run's yaml and training overrides
    if args.mode == "test" and not args.recipe:
        parser.error("test needs the run's yaml and training overrides after --")
    result = test(args) if args.mode == "test" else grid(args)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps({**result, "cpu": cpu_name(), "argv": vars(args)}) + "\n")
