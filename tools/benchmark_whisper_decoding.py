#!/usr/bin/env python3
"""Whisper test decoding speed: utterances per second of the recipes' searchers, one utterance
at a time against batches, greedy and beam search, in one process.

The model is built as the recipes build it (``hparams/whisper.yaml``'s ``whisper`` wrapper on
``--model``, at each ``--windows`` encoder window) and decodes ``--split`` with the yaml's own
searchers: ``valid_search`` (SpeechBrain's ``S2SWhisperGreedySearcher``, what validation and the
bundled default's test use) and ``test_search`` (beam 5, the shared default for testing:
``speechtune.whisper_models.WhisperBeamSearcher``; ``beam5_sb`` is SpeechBrain's own
``S2SWhisperBeamSearcher`` with the same settings, which copies the cross-attention cache at
every step). Each batch is timed from the padded waveforms to the token ids (log-mel,
encoder, search; not the file reading), in the duration order the recipes' test loaders use.
Every configuration runs ``--repeats`` times, the configurations interleaved so that a slow
stretch of a shared machine does not fall on one of them alone; the table keeps each one's
fastest pass. WER is scored with the recipes' normaliser for the language:

    python tools/benchmark_whisper_decoding.py --threads 2 \\
        --out tools/benchmark_results/cpu/whisper_decoding

prints a Markdown table (and with ``--out`` writes ``<out>.md`` and appends ``<out>.jsonl``).
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jiwer
import torch
from speechbrain.decoders.seq2seq import S2SWhisperBeamSearcher

from speechtune.data import load_audio, read_manifest
from speechtune.longform import padded
from speechtune.recipe import load_yaml
from speechtune.whisper import scoring_normalizer

REPO = Path(__file__).resolve().parent.parent


def read_split(path, limit):
    """``[(id, seconds, audio path, transcript)]`` of the first ``limit`` rows of a manifest
    (``$data_root``: the folder above its own, as in the bundled corpus)."""
    rows = list(read_manifest(path, Path(path).resolve().parent.parent).values())[:limit]
    return [(r["ID"], r["duration"], r["wav"], r["wrd"]) for r in rows]


def build(model, window, language, workdir):
    """The recipes' Whisper wrapper and searchers (``{greedy, beam5, beam5_sb}``) at ``window``
    seconds."""
    hparams = load_yaml(REPO / "hparams" / "whisper.yaml", {
        "data_folder": str(workdir), "output_folder": str(workdir), "model": model,
        "language": language, "window_seconds": window})
    whisper = hparams["whisper"](source=model)
    whisper.eval()
    beam = hparams["test_search"](module=[whisper])
    searchers = {"greedy": hparams["valid_search"](model=whisper), "beam5": beam,
                 "beam5_sb": S2SWhisperBeamSearcher(module=[whisper],
                                                    **hparams["test_search"].keywords)}
    return whisper, searchers


def decode(whisper, searcher, utterances, audio, batch_size):
    """``(seconds, {id: text})``: ``utterances`` in duration order, ``batch_size`` at a time."""
    order = sorted(utterances, key=lambda u: u[1])
    texts, spent = {}, 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        wavs, lens = padded([audio[u[0]] for u in batch])
        begin = time.perf_counter()
        with torch.inference_mode():
            enc = whisper.forward_encoder(whisper._get_mel(wavs))
            hyps, _, _, _ = searcher(enc, lens)
        spent += time.perf_counter() - begin
        decoded = whisper.tokenizer.batch_decode(hyps, skip_special_tokens=True)
        texts.update(zip((u[0] for u in batch), decoded, strict=True))
    return spent, texts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="packaged:whisper-base")
    parser.add_argument("--split", default=str(REPO / "recipes/Synthetic/data/en/test.csv"))
    parser.add_argument("--language", default="en")
    parser.add_argument("--limit", type=int, default=None, help="first N utterances only")
    parser.add_argument("--windows", default="30,8", help="encoder windows in seconds")
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--searches", default="greedy,beam5,beam5_sb")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="write <out>.md and append <out>.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    utterances = read_split(args.split, args.limit)
    audio = {u[0]: load_audio(u[2], 16000) for u in utterances}
    speech = sum(u[1] for u in utterances)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    searches = args.searches.split(",")

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for window in (float(w) for w in args.windows.split(",")):
            whisper, searchers = build(args.model, window, args.language, workdir)
            normalize = scoring_normalizer(args.language, whisper.tokenizer)
            refs = {u[0]: normalize(u[3]) for u in utterances}
            best = {}
            for _ in range(args.repeats):
                for search in searches:
                    for size in batch_sizes:
                        spent, texts = decode(whisper, searchers[search], utterances, audio,
                                              size)
                        key = (search, size)
                        if key not in best or spent < best[key][0]:
                            best[key] = (spent, texts)
            for (search, size), (spent, texts) in best.items():
                ids = list(refs)
                wer = 100 * jiwer.wer([refs[i] for i in ids], [normalize(texts[i]) for i in ids])
                base = best[(search, batch_sizes[0])][0]
                rows.append({"window_s": window, "search": search, "batch_size": size,
                             "utt_per_s": len(utterances) / spent, "speech_x": speech / spent,
                             "ratio": base / spent, "wer": wer, "seconds": spent})

    hardware = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch " \
               f"{torch.__version__}"
    command = "python tools/benchmark_whisper_decoding.py " + " ".join(argv or sys.argv[1:])
    lines = [f"`{command}` — {args.model}, {len(utterances)} utterances of "
             f"{Path(args.split).parent.name}/{Path(args.split).name} ({speech:.0f} s), "
             f"{hardware}; fastest of {args.repeats} interleaved passes", "",
             "| window | search | batch | utt/s | speech s/s | vs batch "
             f"{batch_sizes[0]} | WER | decode s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['window_s']:g} s | {r['search']} | {r['batch_size']} | "
              f"{r['utt_per_s']:.2f} | {r['speech_x']:.1f} | {r['ratio']:.2f}x | "
              f"{r['wer']:.2f}% | {r['seconds']:.1f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(f"{args.out}.md").write_text(table, encoding="utf-8")
        with open(f"{args.out}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"command": command, "hardware": hardware, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
