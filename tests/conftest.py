"""Shared fixtures: offline mode, the bundled corpus, tiny encoders built from configs."""

import csv
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "recipes" / "Synthetic" / "data"

# A micro WavLM for tests: same 320x CNN arithmetic as WavLM-Large, a few thousand parameters.
MICRO_ENCODER = {
    "model_type": "wavlm",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 4,
    "mask_time_prob": 0.0,
    "vocab_size": 32,
}


@pytest.fixture(scope="session")
def micro_encoder_dir(tmp_path_factory):
    """A micro WavLM saved in HF format (local folder, no hub)."""
    from speechtune.models import build_tiny_encoder

    path = tmp_path_factory.mktemp("micro_wavlm")
    cfg = dict(MICRO_ENCODER)
    return build_tiny_encoder(path, cfg.pop("model_type"), **cfg)


def write_subset(src_dir, dst_dir, counts):
    """Copy the first ``counts[split]`` rows of each bundled manifest, wav paths made absolute."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        with open(src_dir / f"{split}.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for _, r in zip(range(n), reader, strict=False)]
            fields = reader.fieldnames
        for r in rows:
            r["wav"] = r["wav"].replace("$data_root", str(SYNTHETIC))
        with open(dst_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return dst_dir


@pytest.fixture
def synthetic_subset(tmp_path):
    """A data folder with a small English subset of the bundled corpus (same audio files)."""
    write_subset(SYNTHETIC / "en", tmp_path / "data" / "en", {"train": 24, "valid": 6, "test": 6})
    return tmp_path / "data"


def run_recipe(recipe_dir, args, cwd=None, timeout=900):
    """Run a recipe's train.py in a subprocess (offline) and return the completed process."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd or recipe_dir, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc
