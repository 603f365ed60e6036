#!/usr/bin/env python3
"""Measure CoRal preparation with 1 and more worker processes: python local/measure_coral_workers.py

Builds a CoRal-like snapshot in a temporary folder (``read_aloud/train-0000k-of-0000n.parquet``:
utterances of about ``--clip_seconds`` made by concatenating bundled utterances, stored as 16-bit
WAV bytes at ``--rate`` Hz, CoRal's ``audio`` column layout), then times
``speechtune.prepare.coral.prepare_coral`` (decode, resample to 16 kHz, write FLAC, manifest) on
its train split with each ``--workers`` count, into a fresh folder each time. Prints a markdown
table (median wall time of ``--repeats`` runs, audio seconds per wall second, speed-up against the
first count) and the machine; nothing is downloaded.
"""

import argparse
import io
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch
import torchaudio

from speechtune.prepare.coral import prepare_coral

CORPUS = Path(__file__).resolve().parents[1] / "recipes" / "Synthetic" / "data" / "da"


def make_snapshot(root, clips, clip_seconds, rate, shards):
    """``clips`` utterances of about ``clip_seconds`` in ``shards`` parquet shards; returns the
    seconds of audio written."""
    sources = sorted((CORPUS / "wav").glob("*.flac"))
    records, parts, total, seconds, n = [], [], 0.0, 0.0, 0
    while len(records) < clips:
        x, sr = sf.read(sources[n % len(sources)], dtype="float32")
        n += 1
        parts.append(x)
        total += len(x) / sr
        if total >= clip_seconds:
            sig = torchaudio.functional.resample(torch.from_numpy(np.concatenate(parts)), sr, rate)
            buf = io.BytesIO()
            sf.write(buf, sig.clamp(-1, 1).numpy(), rate, format="WAV", subtype="PCM_16")
            i = len(records)
            records.append({"id_recording": f"rec_{i:05d}", "id_speaker": f"spk_{i % 20}",
                            "text": "Det er en prøve.", "age": 30, "gender": "female",
                            "dialect": "fynsk", "country_birth": "DK", "validated": "approved",
                            "audio": {"bytes": buf.getvalue(), "path": f"rec_{i:05d}.wav"}})
            seconds += total
            parts, total = [], 0.0
    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("id_recording", pa.string()), ("id_speaker", pa.string()),
                        ("text", pa.string()), ("age", pa.int64()), ("gender", pa.string()),
                        ("dialect", pa.string()), ("country_birth", pa.string()),
                        ("validated", pa.string()), ("audio", audio)])
    (root / "read_aloud").mkdir(parents=True)
    size = -(-len(records) // shards)
    for k in range(shards):
        pq.write_table(pa.Table.from_pylist(records[k * size:(k + 1) * size], schema=schema),
                       root / "read_aloud" / f"train-{k:05d}-of-{shards:05d}.parquet")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=240)
    parser.add_argument("--clip_seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=48000, help="Hz of the WAV bytes")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (default: torch's; workers use 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seconds = make_snapshot(tmp / "snapshot", args.clips, args.clip_seconds, args.rate,
                                args.shards)
        rows = []
        for workers in args.workers:
            times = []
            for _ in range(args.repeats):
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                prepare_coral(tmp / "snapshot", out, splits=["train"], num_workers=workers)
                times.append(time.perf_counter() - start)
            rows.append((workers, statistics.median(times)))
    print(f"{args.clips} utterances, {seconds:.1f} s of {args.rate} Hz WAV in {args.shards} "
          f"shards -> 16 kHz FLAC; median of {args.repeats}\n")
    print("| workers | wall s | audio-s per wall-s | speed-up |\n|---:|---:|---:|---:|")
    for workers, wall in rows:
        print(f"| {workers} | {wall:.2f} | {seconds / wall:.0f} | {rows[0][1] / wall:.2f}x |")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, {torch.get_num_threads()} "
          "torch thread(s) in this process")


if __name__ == "__main__":
    main()
