"""WebDataset shards of a training manifest: their contents, resumable writing, the index checks,
and the streaming loader's epochs (coverage, batching, reshuffling, the mid-epoch resume rule)."""

import importlib.util
import io
import json
import os

import pytest
import soundfile as sf
import speechbrain as sb
import webdataset as wds
from fakes import REPO, SYNTHETIC, write_subset
from speechbrain.utils.epoch_loop import EpochCounter

from speechtune import data, shards

spec = importlib.util.spec_from_file_location("make_shards", REPO / "local" / "make_shards.py")
make_shards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_shards)

RATE = 16000


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """The first 48 bundled English training utterances in shards of 0.1 MB (several shards)."""
    root = tmp_path_factory.mktemp("shards")
    manifest = write_subset(SYNTHETIC / "en", root / "data", {"train": 48}) / "train.csv"
    index = make_shards.write_shards(manifest, root / "shards", 0.1, RATE, SYNTHETIC)
    return manifest, root / "shards", index


def dataset_of(manifest):
    """The manifest's rows with the audio pipeline, as a recipe's training dataset."""
    dataset = data.make_dataset(data.read_manifest(manifest, SYNTHETIC), sort_by_duration=False)
    data.add_audio_pipeline([dataset], RATE)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig", "wrd", "duration"])
    return dataset


def test_shards_decode_to_the_manifest_samples_and_rows(shard_set):
    manifest, folder, index = shard_set
    rows = data.read_manifest(manifest, SYNTHETIC)
    assert len(index["shards"]) >= 4
    seen = []
    for name, entry in index["shards"].items():
        samples = list(wds.DataPipeline(wds.SimpleShardList([str(folder / name)]),
                                        wds.tarfile_to_samples()))
        assert [json.loads(s["json"])["ID"] for s in samples] == entry["ids"]
        for sample, seconds in zip(samples, entry["seconds"], strict=True):
            row = json.loads(sample["json"])
            assert {k: row[k] for k in ("wrd", "spk_id")} == \
                {k: rows[row["ID"]][k] for k in ("wrd", "spk_id")}
            sig, rate = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
            info = sf.info(io.BytesIO(sample["flac"]))
            assert rate == RATE and info.channels == 1 and info.subtype == "PCM_16"
            expected = data.load_audio(rows[row["ID"]]["wav"], RATE).numpy()
            assert sig.shape == expected.shape and abs(sig - expected).max() <= 1 / 32768 + 1e-6
            assert seconds == pytest.approx(len(sig) / RATE)
        assert entry["total_seconds"] == pytest.approx(sum(entry["seconds"]))
        seen += entry["ids"]
    assert seen == list(rows)  # every utterance once, in manifest order
    assert not list(folder.glob("*.tmp"))


def test_a_rerun_redoes_only_a_deleted_shard_and_a_partial_one(shard_set, tmp_path):
    manifest, folder, index = shard_set
    copy = tmp_path / "shards"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    names = sorted(index["shards"])
    stamp = {n: os.stat(copy / n).st_mtime_ns for n in names}
    (copy / names[1]).unlink()  # deleted
    (copy / names[-1]).rename(copy / (names[-1] + ".tmp"))  # an interrupted last shard
    (copy / "index.json").unlink()
    logged = []
    again = make_shards.write_shards(manifest, copy, 0.1, RATE, SYNTHETIC, log=logged.append)
    assert sorted(line.split(":")[0] for line in logged) == sorted([names[1], names[-1]])
    assert again["shards"] == index["shards"]  # the same utterances in the same shards
    for n in names[2:-1] + names[:1]:
        assert os.stat(copy / n).st_mtime_ns == stamp[n], n  # untouched
    assert not list(copy.glob("*.tmp"))
    # a shard of another manifest in the folder is refused, never mixed in
    other = write_subset(SYNTHETIC / "en", tmp_path / "other", {"train": 48}) / "train.csv"
    text = other.read_text().replace("en_train_0000", "en_other_0000")
    other.write_text(text)
    with pytest.raises(ValueError, match="another"):
        make_shards.write_shards(other, copy, 0.1, RATE, SYNTHETIC)


def test_the_index_check_and_bad_patterns(shard_set, tmp_path):
    manifest, folder, _ = shard_set
    found = shards.find_shards(str(folder / "shard-{000000..000001}.tar"), RATE)
    assert [os.path.basename(s.path) for s in found] == ["shard-000000.tar", "shard-000001.tar"]
    rows = list(data.read_manifest(manifest, SYNTHETIC).values())
    rows[-1] = dict(rows[-1], duration=rows[-1]["duration"] + 1.0)
    problems = shards.check(found, rows)
    kinds = {p.utt_id: p.kind for p in problems}
    in_two = {u for s in found for u in s.ids}
    assert {u for u, k in kinds.items() if k == "not_in_shards"} == {r["ID"] for r in rows} - in_two
    assert len(shards.check(shards.find_shards(str(folder / "*.tar"), RATE), rows)) == 1
    assert shards.check(shards.find_shards(str(folder / "*.tar"), RATE), rows)[0].kind == \
        "duration_mismatch"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards.find_shards(str(folder / "shard-{000000..000099}.tar"), RATE)
    with pytest.raises(ValueError, match="sample_rate"):
        shards.find_shards(str(folder / "*.tar"), 8000)
    (tmp_path / "shard-000000.tar").write_bytes((folder / "shard-000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        shards.find_shards(str(tmp_path / "*.tar"), RATE)


def loader_of(shard_set, budget=6.0, **kwargs):
    manifest, folder, _ = shard_set
    counter = EpochCounter(3)
    loader = shards.ShardLoader(shards.find_shards(str(folder / "*.tar"), RATE),
                                dataset_of(manifest), counter, 1986,
                                {"max_seconds": budget, "max_utterances": 5, "batch_size": 4},
                                buffer=16, **kwargs)
    return loader, counter


def epoch_ids(loader):
    return [list(batch.id) for batch in loader]


def test_an_epoch_covers_every_utterance_once_in_budget_batches_reshuffled(shard_set):
    loader, counter = loader_of(shard_set)
    rows = data.read_manifest(shard_set[0], SYNTHETIC)
    epochs = []
    for _ in counter:
        batches = []
        for batch in loader:
            seconds = [rows[u]["duration"] for u in batch.id]
            assert len(seconds) <= 5 and len(seconds) * max(seconds) <= 6.0 or len(seconds) == 1
            assert batch.sig.data.shape[0] == len(seconds)
            batches.append(list(batch.id))
        assert len(batches) == len(loader)
        ids = [u for b in batches for u in b]
        assert sorted(ids) == sorted(rows)
        epochs.append(batches)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled, seeded by the epoch
    again, counter = loader_of(shard_set)
    next(iter(counter))
    assert epoch_ids(again) == epochs[0]  # ... reproducibly


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_trains_exactly_the_batches_not_yet_consumed(shard_set, tmp_path,
                                                                      workers):
    """The resume rule: the checkpoint records the batches consumed; a resumed run skips them
    and trains the rest, nothing twice, nothing skipped (with one worker in the same order)."""
    full, counter = loader_of(shard_set, num_workers=workers)
    next(iter(counter))
    whole = epoch_ids(full)
    stopped, counter = loader_of(shard_set, num_workers=workers)
    next(iter(counter))
    first = []
    for batch in stopped:
        first.append(list(batch.id))
        if len(first) == 5:
            break
    stopped.save_position(tmp_path / "state")  # what an intra-epoch checkpoint holds
    assert json.loads((tmp_path / "state").read_text())["consumed"] == 5
    resumed, counter = loader_of(shard_set, num_workers=workers)
    resumed.load_position(tmp_path / "state", end_of_epoch=False)
    next(iter(counter))
    rest = epoch_ids(resumed)
    assert len(first) + len(rest) == len(whole) == len(resumed)
    assert sorted(map(sorted, first + rest)) == sorted(map(sorted, whole))
    if workers == 0:
        assert first + rest == whole
    # an end-of-epoch checkpoint: the next epoch starts at its beginning
    ended, counter = loader_of(shard_set, num_workers=workers)
    ended.load_position(tmp_path / "state", end_of_epoch=True)
    next(iter(counter))
    assert len(epoch_ids(ended)) == len(whole)
    # another plan (here other batching keys) cannot resume this position
    other, counter = loader_of(shard_set, budget=9.0, num_workers=workers)
    other.load_position(tmp_path / "state", end_of_epoch=False)
    next(iter(counter))
    with pytest.raises(ValueError, match="another epoch plan"):
        epoch_ids(other)


def test_processes_get_equal_epoch_lengths_from_their_own_shards(shard_set):
    """Two processes' plans from the index: disjoint shards, every utterance once, the shorter
    padded by repeating its last batch to the common length."""
    manifest, folder, _ = shard_set
    found = shards.find_shards(str(folder / "*.tar"), RATE)
    dataset = dataset_of(manifest)
    seen, lengths = [], []
    for rank in (0, 1):
        counter = EpochCounter(1)
        loader = shards.ShardLoader(found, dataset, counter, 7,
                                    {"max_seconds": 6.0, "max_utterances": 5, "batch_size": 4},
                                    rank=rank, world=2, buffer=16)
        next(iter(counter))
        own = {u for s, _ in loader.plans()[rank] for shard in s for u in shard.ids}
        batches = epoch_ids(loader)
        assert {u for b in batches for u in b} == own
        seen.append(batches)
        lengths.append(len(batches))
    assert lengths[0] == lengths[1]
    ids = [u for batches in seen for b in batches for u in b]
    assert set(ids) == set(dataset.data)
    assert all(batches[-1] == batches[-2] for batches in seen if len(set(map(tuple, batches))) <
               len(batches))  # a repeat is the process's last batch
