#!/usr/bin/env python3
"""Training-loader throughput, shards against per-file audio, side by side in one run.

    OMP_NUM_THREADS=1 python local/measure_shard_loading.py --copies 10 --workers 2

Builds a bigger corpus by copying every bundled English training file ``--copies`` times (distinct
files, so a cold page cache is really cold), its manifest, and its shards
(``local/make_shards.py``); then iterates one training epoch of each loader (the manifest path:
SpeechBrain's DynamicBatchSampler over per-file FLAC; the shard path: ``speechtune.shards``) with
a cold page cache (``drop_caches`` where allowed, and ``posix_fadvise(DONTNEED)`` on every audio
file and shard) and then warm, and prints a table of speech seconds loaded per second.
"""

import argparse
import importlib.util
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import speechbrain as sb
from speechbrain.utils.epoch_loop import EpochCounter

from speechtune import data, shards

HERE = Path(__file__).resolve().parent
SYNTHETIC = HERE.parent / "recipes" / "Synthetic" / "data"
spec = importlib.util.spec_from_file_location("make_shards", HERE / "make_shards.py")
make_shards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_shards)


def build_corpus(work, copies):
    """``copies`` copies of the bundled English training audio and their manifest."""
    rows = list(data.read_manifest(SYNTHETIC / "en" / "train.csv", SYNTHETIC).values())
    out = []
    for k in range(copies):
        folder = work / "audio" / f"copy{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for row in rows:
            path = folder / Path(row["wav"]).name
            if not path.exists():
                shutil.copyfile(row["wav"], path)
            out.append({**row, "ID": f"{row['ID']}_c{k}", "wav": str(path)})
    return data.write_manifest(work / "train.csv", out, out[0].keys()), out


def evict(paths):
    """Drop the files' pages from the page cache (``drop_caches`` where allowed, and
    ``posix_fadvise(DONTNEED)`` on each file either way); returns how."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        how = "drop_caches + posix_fadvise(DONTNEED)"
    except OSError:
        how = "posix_fadvise(DONTNEED)"
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def epoch_rate(loader):
    """One pass: (speech seconds, wall seconds, batches)."""
    speech, batches, start = 0.0, 0, time.perf_counter()
    for batch in loader:
        speech += float(sum(batch.duration))
        batches += 1
    return speech, time.perf_counter() - start, batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--shard_mb", type=float, default=20.0)
    parser.add_argument("--max_batch_seconds", type=float, default=100.0)
    parser.add_argument("--work", default=None, help="folder for the corpus (default: a temp)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="shard_loading_"))
    manifest, rows = build_corpus(work, args.copies)
    start = time.perf_counter()
    make_shards.write_shards(manifest, work / "shards", args.shard_mb, 16000, "", log=print)
    print(f"shards written in {time.perf_counter() - start:.1f} s")
    dataset = data.make_dataset(data.read_manifest(manifest, ""), sort_by_duration=False)
    data.add_audio_pipeline([dataset], 16000)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig", "duration"])
    sampler = data.dynamic_batch_sampler(dataset, args.max_batch_seconds, 60, shuffle=True,
                                         seed=1986, max_batch_ex=64)
    per_file = sb.dataio.dataloader.make_dataloader(dataset, batch_sampler=sampler,
                                                    num_workers=args.workers)
    found = shards.find_shards(str(work / "shards" / "*.tar"), 16000)
    counter = EpochCounter(1)
    next(iter(counter))
    sharded = shards.ShardLoader(found, dataset, counter, 1986,
                                 {"max_seconds": args.max_batch_seconds, "max_utterances": 64,
                                  "batch_size": 8}, num_workers=args.workers)
    files = {"manifest (one file per utterance)": [r["wav"] for r in rows],
             "shards (speechtune.shards)": [s.path for s in found]}
    loaders = dict(zip(files, (per_file, sharded), strict=True))
    results = {}
    for name, loader in loaders.items():
        how = evict(files[name])
        results[name, "cold"] = epoch_rate(loader)
        results[name, "warm"] = epoch_rate(loader)
    size = sum(os.path.getsize(p) for p in files["manifest (one file per utterance)"])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"\ncorpus: {len(rows)} utterances ({args.copies} copies of the bundled en train), "
          f"{sum(r['duration'] for r in rows) / 3600:.2f} h, {size / 1e6:.0f} MB FLAC in "
          f"{len(rows)} files / {len(found)} shards of ~{args.shard_mb:g} MB; {work}")
    print(f"hardware: {cpu}, {os.cpu_count()} cores visible; loader workers: {args.workers}; "
          f"cold cache by {how}\n")
    print("| loader | cache | batches | speech s | wall s | speech s / s | vs manifest |")
    print("|---|---|---|---|---|---|---|")
    for (name, cache), (speech, wall, batches) in results.items():
        base = results["manifest (one file per utterance)", cache]
        ratio = (speech / wall) / (base[0] / base[1])
        print(f"| {name} | {cache} | {batches} | {speech:.0f} | {wall:.2f} | "
              f"{speech / wall:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
