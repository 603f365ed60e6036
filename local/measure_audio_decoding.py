#!/usr/bin/env python3
"""Measure what CommonVoice audio costs per epoch: python local/measure_audio_decoding.py

Compares, in one process with one torch thread (as in a DataLoader worker), the CPU time of
  on_the_fly  decode a 48 kHz mono mp3 and resample it to 16 kHz (speechtune.data.load_audio,
              what the recipe does at every epoch with resample: on_the_fly),
  once: read  read the 16 kHz FLAC that resample: once wrote (load_audio again, no resampling),
  once: write the one-time conversion (speechtune.prepare.commonvoice.convert_clip).
The clips are bundled utterances (recipes/Synthetic/data) concatenated to CommonVoice-like
lengths and written as 48 kHz mp3 in a temporary folder; nothing is downloaded. Prints a markdown
table, the break-even number of epochs and the machine.
"""

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from speechtune.data import load_audio
from speechtune.prepare.commonvoice import convert_clip

CORPUS = Path(__file__).resolve().parents[1] / "recipes" / "Synthetic" / "data"


def make_clips(folder, utterances, clip_seconds, rate=48000):
    """Concatenate ``utterances`` bundled files into clips of about ``clip_seconds``, written as
    mono mp3 at ``rate``; returns the clip paths."""
    sources = sorted((CORPUS / "en" / "wav").glob("*.flac")) + sorted(
        (CORPUS / "da" / "wav").glob("*.flac"))
    if len(sources) < utterances:
        sys.exit(f"only {len(sources)} bundled utterances; ask for fewer")
    paths, parts, total = [], [], 0
    for n, flac in enumerate(sources[:utterances], 1):
        x, sr = sf.read(flac, dtype="float32")
        parts.append(x)
        total += len(x) / sr
        if total >= clip_seconds or n == utterances:
            sig = torchaudio.functional.resample(torch.from_numpy(np.concatenate(parts)), sr, rate)
            path = folder / f"clip_{len(paths):04d}.mp3"
            sf.write(path, sig.clamp(-1, 1).numpy(), rate, format="MP3")
            paths.append(path)
            parts, total = [], 0
    return paths


def cpu_time(fn, items, before=None):
    """``(CPU seconds, wall seconds)`` of ``fn(item)`` over ``items`` in this process."""
    if before:
        before()
    cpu, wall = time.process_time(), time.perf_counter()
    for item in items:
        fn(item)
    return time.process_time() - cpu, time.perf_counter() - wall


def machine():
    """One line about this machine: platform, CPU model, cores, load, library versions."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{platform.platform()}; {model}; {os.cpu_count()} logical CPUs; load average "
            f"{load}; python {platform.python_version()}, torch {torch.__version__}, torchaudio "
            f"{torchaudio.__version__}, soundfile {sf.__version__} (libsndfile "
            f"{sf.__libsndfile_version__})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=200, help="bundled utterances used")
    parser.add_argument("--clip_seconds", type=float, default=5.0, help="length of each clip")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    parser.add_argument("--sample_rate", type=int, default=16000, help="the model's rate (Hz)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker is single-threaded too
    rate = args.sample_rate
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mp3s = make_clips(tmp, args.utterances, args.clip_seconds)
        seconds = sum(sf.info(p).duration for p in mp3s)
        flac_dir = tmp / "flac"
        flacs = [flac_dir / f"{p.stem}.flac" for p in mp3s]

        def fresh():
            shutil.rmtree(flac_dir, ignore_errors=True)
            flac_dir.mkdir()

        load_audio(str(mp3s[0]), rate)  # warm-up (imports, resampling kernels)
        runs = {"on_the_fly": [], "once: write": [], "once: read": []}
        for _ in range(args.repeats):
            runs["on_the_fly"].append(cpu_time(lambda p: load_audio(str(p), rate), mp3s))
            runs["once: write"].append(cpu_time(
                lambda pair: convert_clip((str(pair[0]), str(pair[1]), rate)),
                list(zip(mp3s, flacs, strict=True)), before=fresh))
            runs["once: read"].append(cpu_time(lambda p: load_audio(str(p), rate), flacs))
        sizes = [sum(p.stat().st_size for p in paths) / 2**20 for paths in (mp3s, flacs)]
    cpu = {k: statistics.median(c for c, _ in v) for k, v in runs.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in runs.items()}
    what = {"on_the_fly": "mp3 48 kHz -> decode + resample to 16 kHz (every epoch)",
            "once: read": "FLAC 16 kHz -> decode (every epoch)",
            "once: write": "mp3 -> decode + resample + write FLAC (one time)"}
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine()}")
    print(f"{len(mp3s)} clips, {seconds:.1f} s of audio ({args.utterances} bundled utterances, "
          f"~{args.clip_seconds:g} s each), 1 process, 1 torch thread, median of "
          f"{args.repeats} runs\n")
    print("| path | what | clips | audio s | CPU s | wall s | audio-s per CPU-s "
          "| CPU vs on_the_fly |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in ("on_the_fly", "once: read", "once: write"):
        print(f"| {name} | {what[name]} | {len(mp3s)} | {seconds:.1f} | {cpu[name]:.3f} | "
              f"{wall[name]:.3f} | {seconds / cpu[name]:.0f} | "
              f"{cpu[name] / cpu['on_the_fly']:.2f}x |")
    saved = cpu["on_the_fly"] - cpu["once: read"]
    epochs = cpu["once: write"] / saved if saved > 0 else float("inf")
    per_100h = {k: 100 * 3600 * v / seconds / 3600 for k, v in cpu.items()}
    print(f"\nonce pays its conversion back after {epochs:.1f} epoch(s); per 100 h of audio: "
          f"on_the_fly {per_100h['on_the_fly']:.2f} CPU-h per epoch, once "
          f"{per_100h['once: read']:.2f} CPU-h per epoch + {per_100h['once: write']:.2f} CPU-h "
          f"one time; disk: {sizes[0]:.1f} MiB of mp3 (LAME defaults here, not CommonVoice's "
          f"encoder) -> {sizes[1]:.1f} MiB of 16-bit FLAC")


if __name__ == "__main__":
    main()
