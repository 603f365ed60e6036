"""Training from shards: a tiny CTC recipe epoch whose training audio exists only in the shards,
and two DDP processes (torchrun, gloo on CPU) that each read their own shards and together cover
every training utterance once per epoch."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from fakes import REPO, SYNTHETIC, experiment, write_subset

from speechtune import data, shards

spec = importlib.util.spec_from_file_location("make_shards", REPO / "local" / "make_shards.py")
make_shards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_shards)

DDP_SCRIPT = """
import json, sys
import speechbrain as sb
import torch.distributed as dist
from speechbrain.utils.epoch_loop import EpochCounter
from speechtune import data, shards

dist.init_process_group("gloo")
manifest, folder, out = sys.argv[1:]
dataset = data.make_dataset(data.read_manifest(manifest, ""), sort_by_duration=False)
data.add_audio_pipeline([dataset], 16000)
sb.dataio.dataset.set_output_keys([dataset], ["id", "sig"])
hparams = {"max_batch_seconds": 6.0, "dynamic_batching": True, "max_batch_utterances": 5,
           "batch_size": 4, "seed": 1986, "num_workers": 1, "epoch_counter": EpochCounter(2)}
loader = shards.train_loader(hparams, dataset, shards.find_shards(folder + "/*.tar", 16000),
                             None)
epochs = [[list(batch.id) for batch in loader] for _ in hparams["epoch_counter"]]
json.dump(epochs, open(f"{out}.{dist.get_rank()}.json", "w"))
"""


def sharded_corpus(tmp_path):
    """A 40/6/6 subset whose training utterances are in shards, their files then gone."""
    data_dir = tmp_path / "data"
    write_subset(SYNTHETIC / "en", data_dir / "en", {"train": 40, "valid": 6, "test": 6})
    manifest = data_dir / "en" / "train.csv"
    make_shards.write_shards(manifest, tmp_path / "shards", 0.1, 16000, SYNTHETIC)
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["wav"] = str(tmp_path / "gone" / os.path.basename(row["wav"]))
    data.write_manifest(manifest, rows, rows[0].keys())
    return data_dir, str(tmp_path / "shards" / "shard-*.tar")


def test_a_tiny_recipe_epoch_trains_from_shards_alone(tmp_path):
    """The training rows' files are gone after sharding: the epoch reads the shards' audio; the
    pre-flight checks the index instead of the files; the loader's length is the epoch's."""
    data_dir, pattern = sharded_corpus(tmp_path)
    exp = experiment(data_dir, tmp_path / "out", num_workers=0, train_shards=pattern)
    assert isinstance(exp.train, shards.ShardLoader)
    steps = len(exp.train)
    exp.fit()
    log = (tmp_path / "out" / "train_log.txt").read_text(encoding="utf-8")
    assert f"epoch: 1, step: {steps}," in log
    ckpt = next((tmp_path / "out" / "save").glob("CKPT+*"))
    assert json.loads((ckpt / "shards-TRAIN.ckpt").read_text())["consumed"] == steps


class Stop(Exception):
    pass


def test_a_run_stopped_mid_epoch_resumes_with_the_batches_it_had_not_trained(tmp_path):
    """The resume rule in a recipe: stopped after 5 batches, the last checkpoint after 3; the
    rerun trains batches 4.. of the same epoch plan, so batches 4 and 5 are trained again (they
    were after the checkpoint) and none is skipped or trained a third time."""
    data_dir, pattern = sharded_corpus(tmp_path)
    trained = []

    def experiment_stopping_after(n):
        exp = experiment(data_dir, tmp_path / "out", num_workers=0, train_shards=pattern,
                         ckpt_interval_steps=3)
        fit_batch = exp.brain.fit_batch

        def recording(batch):
            if len(trained) == n:
                raise Stop
            trained.append(list(batch.id))
            return fit_batch(batch)

        exp.brain.fit_batch = recording
        return exp

    with pytest.raises(Stop):
        experiment_stopping_after(5).fit()
    first = trained[:3]
    trained.clear()
    resumed = experiment_stopping_after(None)
    resumed.fit()
    plan = [batch for _, batches in resumed.train.plans(1)[0] for batch in batches]
    assert first + trained == plan


def test_two_ddp_processes_read_their_own_shards_and_cover_every_utterance(tmp_path):
    """49 utterances make 6 shards of about 0.1 MB (3 per process): at most one batch is trained
    twice (the shorter process's last one, repeated to the common epoch length)."""
    manifest = write_subset(SYNTHETIC / "en", tmp_path / "data", {"train": 49}) / "train.csv"
    make_shards.write_shards(manifest, tmp_path / "shards", 0.1, 16000, SYNTHETIC)
    script = tmp_path / "ddp_shards.py"
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(script), str(manifest), str(tmp_path / "shards"),
                           str(tmp_path / "ids")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"ids.{r}.json").read_text()) for r in (0, 1)]
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    shard_of = {u: name for name, entry in index["shards"].items() for u in entry["ids"]}
    everyone = set(shard_of)
    for epoch in (0, 1):
        one, two = ranks[0][epoch], ranks[1][epoch]
        assert len(one) == len(two)  # every process steps the same number of times
        files = [{shard_of[u] for b in batches for u in b} for batches in (one, two)]
        assert not files[0] & files[1]  # each reads its own shards
        ids = [u for batches in (one, two) for b in batches for u in b]
        assert set(ids) == everyone
        repeated = len(ids) - len(set(ids))
        assert repeated <= max(len(b) for b in one + two)  # at most one padded batch twice
    assert ranks[0][0] != ranks[0][1]  # reshuffled by epoch
