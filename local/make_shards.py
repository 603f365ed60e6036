#!/usr/bin/env python3
"""Write a prepared manifest's utterances as WebDataset tar shards for ``train_shards``.

    python local/make_shards.py --manifest results/x/train.csv --data_root /data/corpus \
        --out /data/shards/x --shard_mb 200 [--sample_rate 16000]

Per utterance a shard holds its audio as mono 16-bit FLAC at ``--sample_rate`` (resampled, mixed
down) and its manifest row as JSON; ``index.json`` (shard -> utterance IDs, audio seconds) is
written last (the format: ``speechtune.shards``). Resumable: each shard is written under a
``.tmp`` name and renamed when complete; a rerun keeps complete shards and writes only missing or
partial ones. Then train with ``--train_shards='/data/shards/x/shard-*.tar'`` (docs/shards.md).
"""

import argparse
import io
import json
import logging
from pathlib import Path

import soundfile as sf
import webdataset as wds

from speechtune import data
from speechtune.shards import INDEX, SHARD

logger = logging.getLogger(__name__)


def encode_flac(sig, sample_rate) -> bytes:
    """A mono float signal as 16-bit FLAC bytes (samples beyond full scale are clamped)."""
    out = io.BytesIO()
    sf.write(out, sig.clamp(-1.0, 1.0).numpy(), sample_rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def read_shard(path):
    """``(ids, seconds, sample rates)`` of the utterances in a shard, in their order."""
    ids, seconds, rates = [], [], set()
    for sample in wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()):
        ids.append(json.loads(sample["json"])["ID"])
        info = sf.info(io.BytesIO(sample["flac"]))
        seconds.append(info.frames / info.samplerate)
        rates.add(info.samplerate)
    return ids, seconds, rates


def write_shards(manifest, out_dir, shard_mb, sample_rate, data_root, log=logger.info):
    """Write ``manifest``'s utterances (in its order) as shards of about ``shard_mb`` MB into
    ``out_dir``, then ``index.json``; returns the index.

    Resumable: a shard is written as ``<name>.tmp`` and renamed when complete; a rerun deletes
    ``.tmp`` files, keeps the complete shards (each must hold the manifest rows it held before)
    and writes only the missing ones: a missing shard between two complete ones gets exactly the
    rows between them."""
    rows = list(data.read_manifest(manifest, data_root).values())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    done = {}
    for path in sorted(out.glob("shard-*.tar")):
        try:
            ids, seconds, rates = read_shard(path)
        except Exception as err:  # a damaged tar (tarfile, soundfile, json errors): made again
            log(f"{path.name} cannot be read ({err}): made again")
            path.unlink()
            continue
        if rates - {sample_rate}:
            raise ValueError(f"{path} holds audio at {sorted(rates)} Hz, not {sample_rate}: "
                             "write shards of another rate into another folder")
        done[int(path.stem.split("-")[1])] = (ids, seconds)
    position = {r["ID"]: n for n, r in enumerate(rows)}
    entries, pos, number = {}, 0, 0
    while pos < len(rows):
        if number in done:
            ids, seconds = done.pop(number)
            if [r["ID"] for r in rows[pos:pos + len(ids)]] != ids:
                raise ValueError(f"{out / SHARD.format(number)} holds other utterances than rows "
                                 f"{pos + 1}.. of {manifest}: the folder holds shards of another "
                                 "(or an edited) manifest; use a new folder or delete them")
            entries[number] = (ids, seconds)
            pos, number = pos + len(ids), number + 1
            continue
        after = min(done, default=None)  # the next complete shard: the gap ends at its rows
        end = len(rows) if after is None else position.get(done[after][0][0], -1)
        if end < pos:
            raise ValueError(f"{out / SHARD.format(after)} starts with an utterance that is not "
                             f"next in {manifest}: use a new folder or delete its shards")
        last = None if after is None else after - 1
        entries.update(_write_run(rows, pos, end, out, number, last, shard_mb * 1e6,
                                  sample_rate, log))
        pos, number = end, max(entries, default=-1) + 1 if after is None else after
    if done:
        raise ValueError(f"{out}: shard(s) {[SHARD.format(k) for k in sorted(done)]} hold rows "
                         f"past the end of {manifest}: delete them or use a new folder")
    index = {"sample_rate": sample_rate, "manifest": str(manifest), "shards": {
        SHARD.format(k): {"ids": ids, "seconds": seconds, "total_seconds": sum(seconds)}
        for k, (ids, seconds) in sorted(entries.items())}}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index), encoding="utf-8")
    tmp.replace(out / INDEX)
    return index


def _write_run(rows, start, end, out, number, last, max_bytes, sample_rate, log):
    """Rows ``start:end`` into shards ``number``, ``number + 1``, ... (never past ``last``)."""
    written, shard = {}, None  # shard: [writer, temp path, bytes, ids, seconds]

    def close():
        shard[0].close()
        final = out / SHARD.format(number)
        shard[1].replace(final)
        written[number] = (shard[3], shard[4])
        log(f"{final.name}: {len(shard[3])} utterances, {sum(shard[4]):.1f} s")

    for n in range(start, end):
        sig = data.load_audio(rows[n]["wav"], sample_rate)
        flac = encode_flac(sig, sample_rate)
        if shard is not None and shard[2] + len(flac) > max_bytes and number != last:
            close()
            shard, number = None, number + 1
        if shard is None:
            tmp = out / (SHARD.format(number) + ".tmp")
            # a whole-second mtime: no PAX header per member (faster to read); a fixed one,
            # so the same rows give the same bytes
            shard = [wds.TarWriter(str(tmp), mtime=0), tmp, 0, [], []]
        shard[2] += shard[0].write({"__key__": f"{n:09d}", "flac": flac,
                                    "json": json.dumps(rows[n], ensure_ascii=False)})
        shard[3].append(rows[n]["ID"])
        shard[4].append(len(sig) / sample_rate)
    if shard is not None:
        close()
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="manifest CSV (ID,duration,wav,...)")
    parser.add_argument("--data_root", default="", help="what $data_root in `wav` stands for")
    parser.add_argument("--out", required=True, help="the shard folder")
    parser.add_argument("--shard_mb", type=float, default=200.0, help="target shard size, MB")
    parser.add_argument("--sample_rate", type=int, default=16000, help="the recipe's rate, Hz")
    args = parser.parse_args(argv)
    index = write_shards(args.manifest, args.out, args.shard_mb, args.sample_rate,
                         args.data_root, log=print)
    seconds = sum(e["total_seconds"] for e in index["shards"].values())
    print(f"{args.out}: {len(index['shards'])} shards, {seconds / 3600:.2f} h "
          f"({Path(args.out) / INDEX} written)")


if __name__ == "__main__":
    main()
