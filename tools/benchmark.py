"""Training throughput of a recipe's real step, beside a plain Hugging Face loop on the same data.

For one model (``--model``) this builds a random-init model of real size from its config (no
download), loads the recipe's yaml with the benchmark's overrides, and builds the experiment the way
``train.py`` does (pre-flight, datasets, data loader, Brain). Then, for each ``--variants`` entry:

- ``hf``: a plain transformers step (``AutoModelForCTC`` / ``WhisperForConditionalGeneration``,
  autocast, AdamW, gradient clipping) over the same batches, taken from the recipe's loader
  beforehand (so the HF loop never waits for data: the ratio does not flatter the recipe);
- ``recipe`` variants: the recipe's own ``Brain.fit_batch`` fed by its live data loader, with
  the variant's overrides (``eager`` / ``sdpa`` WavLM attention, ``compile``, ``cache`` for the
  Whisper encoder cache: one pass fills it, the timed pass reads it; ``lora``: rank-8 adapters
  on the CTC encoder or Whisper's decoder, ``gc``: gradient checkpointing, ``lora+gc``: both).

Each result is one JSON line (``<out>/results.jsonl``, appended) and a row of ``<out>/results.md``:
speech seconds trained per second (padding is not counted), the ratio to the ``hf`` row, TFLOP/s
and MFU (FLOPs of one step counted by ``torch.utils.flop_counter`` on the first batch, scaled to
each timed batch by its padded size), peak GPU memory, the batches' padding fraction, and the data
loader's own throughput (its workers iterating the same sampler without the model).

Data: ``bundled`` (the Synthetic corpus, 1.5-3.5 s utterances) or ``librispeech-like`` (bundled
utterances joined up to targets drawn around LibriSpeech train-clean-100's mean of 12.7 s, spread
3.5 s, within 1-24.5 s; 13.9 s on average after the last piece's overshoot; written once as FLAC
in ``--workdir``).

Run (GPU):  python tools/benchmark.py --model wavlm-large --variants hf,eager,sdpa,sdpa+compile
Run (CPU):  python tools/benchmark.py --model wavlm-tiny --data bundled --steps 10
"""

import argparse
import collections
import contextlib
import csv
import gc
import itertools
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import speechbrain as sb
import torch
import yaml
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from speechtune import buckets
from speechtune.data import Manifests, write_manifest
from speechtune.recipe import build_experiment, load_hparams, yaml_family

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "recipes" / "Synthetic" / "data"
logger = logging.getLogger("benchmark")

_SSL_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "conv_dim": [512] * 7,
              "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
              "feat_extract_norm": "layer", "do_stable_layer_norm": True,
              "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}
# name -> (recipe yaml, model config); real sizes are those of the hub models' configs; the
# family is the yaml's
MODELS = {
    "wavlm-large": ("LibriSpeech/CTC/hparams/wavlm_large.yaml",
                    {"model_type": "wavlm", "conv_bias": False, **_SSL_LARGE}),
    "wav2vec2-large": ("LibriSpeech/CTC/hparams/wavlm_large.yaml",
                       {"model_type": "wav2vec2", "conv_bias": True, **_SSL_LARGE}),
    "whisper-small": ("LibriSpeech/Whisper/hparams/whisper_small_en.yaml",
                      {"multilingual": False, "d_model": 768, "encoder_layers": 12,
                       "decoder_layers": 12, "encoder_attention_heads": 12,
                       "decoder_attention_heads": 12, "encoder_ffn_dim": 3072,
                       "decoder_ffn_dim": 3072, "num_mel_bins": 80}),
    "whisper-medium": ("LibriSpeech/Whisper/hparams/whisper_medium_en.yaml",
                       {"multilingual": False, "d_model": 1024, "encoder_layers": 24,
                        "decoder_layers": 24, "encoder_attention_heads": 16,
                        "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                        "decoder_ffn_dim": 4096, "num_mel_bins": 80}),
    "whisper-large-v3": ("LibriSpeech/Whisper/hparams/whisper_medium_en.yaml",
                         {"multilingual": True, "d_model": 1280, "encoder_layers": 32,
                          "decoder_layers": 32, "encoder_attention_heads": 20,
                          "decoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                          "decoder_ffn_dim": 5120, "num_mel_bins": 128}),
    # CPU baselines: the bundled recipes' own tiny models
    "wavlm-tiny": ("Synthetic/CTC/hparams/wavlm_tiny.yaml", None),
    "whisper-tiny": ("Synthetic/Whisper/hparams/whisper_tiny.yaml", None),
}
# stands for the family's first lora part (Family.lora_parts), set when a variant is built
FAMILY_LORA = "<family's first lora part>"
# variant -> (yaml overrides, run_opts)
VARIANTS = {
    "eager": ({"attention": "eager"}, {}),
    "sdpa": ({"attention": "sdpa"}, {}),
    "sdpa+compile": ({"attention": "sdpa"}, {"compile": True}),
    "sdpa+compile-dynamic": ({"attention": "sdpa"}, {
        "compile": True, "compile_using_dynamic_shape_tracing": True}),
    # batches padded to the lengths 1.25**k s (speechtune.buckets): one compile per length
    "sdpa+buckets": ({"attention": "sdpa", "bucket_ratio": 1.25}, {}),
    "sdpa+compile+buckets": ({"attention": "sdpa", "bucket_ratio": 1.25}, {"compile": True}),
    # torch's automatic dynamic shapes (dynamic=None): a dimension seen with two sizes is
    # compiled symbolic from then on (SpeechBrain's default, False, specialises every size)
    "sdpa+compile-auto": ({"attention": "sdpa"}, {
        "compile": True, "compile_using_dynamic_shape_tracing": None}),
    "sdpa+compile-auto+buckets": ({"attention": "sdpa", "bucket_ratio": 1.25}, {
        "compile": True, "compile_using_dynamic_shape_tracing": None}),
    # the same with CUDA graphs (torch.compile's "reduce-overhead"): each shape's kernels are
    # recorded once and replayed by one launch; on the CPU it compiles like the line above
    "sdpa+compile-graphs+buckets": ({"attention": "sdpa", "bucket_ratio": 1.25}, {
        "compile": True, "compile_mode": "reduce-overhead",
        "compile_using_dynamic_shape_tracing": None}),
    "recipe": ({}, {}),
    "recipe+compile": ({}, {"compile": True}),
    "cache": ({"encoder_cache": "memory"}, {}),
    # LoRA (rank 8 on q and v) on the family's first lora part: the CTC encoder, Whisper's decoder
    "lora": ({"lora": FAMILY_LORA}, {}),
    "gc": ({"gradient_checkpointing": True}, {}),
    "lora+gc": ({"lora": FAMILY_LORA, "gradient_checkpointing": True}, {}),
}
RECOMPILE_LIMIT = torch._dynamo.config.recompile_limit  # torch's default
# dense bf16 peak (no sparsity) by device name, for MFU
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("A10", 125e12)]
LIBRISPEECH_LIKE = {"mean": 12.7, "sd": 3.5, "low": 1.0, "high": 24.5}


# ---------------------------------------------------------------------------- data
def librispeech_like_corpus(folder, n, mean=12.7, sd=3.5, seed=0):
    """Join bundled English utterances (audio and transcripts) into ``n`` utterances, each filled
    with whole utterances up to a target drawn from normal(``mean``, ``sd``) clipped to 1-24.5 s
    (the last one overshoots: the durations come out about 1.2 s longer, 13.9 s on average for
    the default 12.7); returns the manifest (written once, reused after)."""
    folder = Path(folder)
    manifest = folder / f"train_{n}_{mean:g}_{sd:g}_{seed}.csv"
    if manifest.exists():
        return manifest
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    with open(SYNTHETIC / "en" / "train.csv", newline="", encoding="utf-8") as f:
        pieces = list(csv.DictReader(f))
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        target = min(max(rng.gauss(mean, sd), LIBRISPEECH_LIKE["low"]),
                     LIBRISPEECH_LIKE["high"])
        audio, words, total = [], [], 0.0
        while total < target:
            piece = rng.choice(pieces)
            wav, rate = sf.read(piece["wav"].replace("$data_root", str(SYNTHETIC)),
                                dtype="float32")
            audio.append(wav)
            words.append(piece["wrd"])
            total += len(wav) / rate
        name = f"ls_like_{mean:g}_{sd:g}_{seed}_{i:05d}"
        path = folder / "wav" / f"{name}.flac"
        sf.write(path, np.concatenate(audio), rate)
        rows.append({"ID": name, "duration": f"{total:.3f}",
                     "wav": str(path), "spk_id": "synthetic", "wrd": " ".join(words)})
    return write_manifest(manifest, rows, rows[0])


def prepare_fixed(train, valid):
    """A ``prepare`` function for ``build_experiment`` that returns fixed manifests."""
    return lambda hparams: Manifests(train=str(train), valid=str(valid), tests={})


# ---------------------------------------------------------------------------- models
def build_model(family, config, folder, texts):
    """A random-init model of real size in HF format (built once per ``folder``)."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return str(folder)
    return family.build_random_model(folder, config, texts)


def experiment_for(args, yaml_path, overrides, run_opts, out):
    """Load the recipe yaml with ``overrides`` and build its experiment like ``train.py``."""
    argv = [str(REPO / "recipes" / yaml_path), f"--output_folder={out}",
            *(f"--{k}={v if isinstance(v, str) else json.dumps(v)}"
              for k, v in overrides.items())]
    hparams, _ = load_hparams(argv, record=False)
    Path(out).mkdir(parents=True, exist_ok=True)
    return build_experiment(hparams, {"device": args.device, **run_opts},
                            prepare_fixed(args.train_manifest, args.valid_manifest))


def base_overrides(args, family, model_dir):
    """What every variant sets: data, model, precision, one batch per optimizer step, batch
    size, augmentation on/off, and the family's own (``benchmark_overrides``)."""
    gpu = args.device.startswith("cuda")
    o = {"data_folder": str(SYNTHETIC), "number_of_epochs": 1, "grad_accumulation_factor": 1,
         "precision": "bf16" if gpu else "fp32", "num_workers": args.num_workers,
         "preflight": "skip", "min_duration": 0.0, "max_duration": 30.0}
    if not args.augment:
        o["augmenter"] = None
    o.update(family.benchmark_overrides(args.batch_seconds, args.batch_size,
                                        real_model=model_dir is not None))
    if model_dir is not None:
        o["model"] = str(model_dir)
    if args.num_workers is None:
        del o["num_workers"]
    return o


# ---------------------------------------------------------------------------- measuring
def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speech_seconds(batch):
    return float(sum(batch.duration))


def padding_fraction(batch, bucket_ratio=None, sample_rate=16000):
    """Share of the batch's samples that are padding (SpeechBrain relative lengths), at its
    bucket length with ``bucket_ratio`` (``speechtune.buckets``: the encoder's input)."""
    length = batch.sig[0].shape[1]
    padded = length if bucket_ratio is None else \
        buckets.bucket_samples(length, sample_rate, bucket_ratio)
    return 1.0 - float(batch.sig[1].mean()) * length / padded


def count_flops(step, batch):
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def timed(step, batches, warmup, device, speech=speech_seconds):
    """Run ``step`` over ``batches``; seconds and speech seconds of the batches after
    ``warmup``, and seconds of the warmup ones (compilation shows there)."""
    sync(device)
    start = time.perf_counter()
    warm_end, done = start, []
    for i, batch in enumerate(batches):
        if i == warmup:
            sync(device)
            warm_end = time.perf_counter()
        step(batch)
        if i >= warmup:
            done.append(batch)
    sync(device)
    return time.perf_counter() - warm_end, sum(map(speech, done)), warm_end - start, done


def host_syncs(step, batches, device):
    """How often ``len(batches)`` steps made the host wait for the GPU (CUDA's sync debug
    mode), and the five lines that did most; None on the CPU."""
    if not device.startswith("cuda"):
        return None, None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches:
                step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return sum(sites.values()), [f"{site} x{n}" for site, n in sites.most_common(5)]


def profile_table(step, batches, device, path):
    """torch.profiler over ``batches``: the top operators by device time, and how much of the
    wall time the device was busy (written to ``path``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "cuda_time_total" if device != "cpu" else "cpu_time_total"
    head = f"{len(batches)} steps, wall {wall:.3f} s"
    if device != "cpu":
        kernels = sum(e.self_device_time_total for e in events) / 1e6
        head += f", device busy (sum of kernel times) {kernels:.3f} s = {kernels / wall:.0%}"
    Path(path).write_text(head + "\n\n" + events.table(sort_by=sort, row_limit=30),
                          encoding="utf-8")


def hf_step_fn(exp, args):
    """A plain transformers training step on a recipe batch (same model weights, same inputs:
    the family's ``hf_reference``)."""
    device, gpu = args.device, args.device.startswith("cuda")
    model, inputs, attention = exp.family.hf_reference(exp.brain, device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=gpu)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

    def step(prepared):
        with autocast:
            loss = model(**prepared).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, inputs, attention, model


def recipe_step_fn(exp):
    brain = exp.brain
    brain.on_fit_start()  # optimizers, torch.compile, (nothing to) recover
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    brain.modules.train()

    def step(batch):
        brain.step += 1
        brain.fit_batch(batch)
    return step


def train_loader(exp):
    """The recipe's training loader (its sampler, batch sizes and workers), from the start."""
    return exp.brain.make_dataloader(exp.train, sb.Stage.TRAIN, ckpt_prefix=None,
                                     **exp.loader_kwargs["train"])


def loader_throughput(exp, n_batches):
    """Speech seconds per second the recipe's data loader delivers on its own."""
    loader = train_loader(exp)
    start, speech = time.perf_counter(), 0.0
    for i, batch in enumerate(loader):
        if i == n_batches:
            break
        speech += speech_seconds(batch)
    return speech / (time.perf_counter() - start)


def train_batches(exp, n):
    """The first ``n`` batches of the recipe's training loader (same order every time)."""
    loader = train_loader(exp)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            return batches
    raise SystemExit(f"the training data gives {len(batches)} batches, fewer than warmup + "
                     f"steps = {n}: pass --utterances with a larger number or fewer --steps")


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def run_variant(args, variant, family, yaml_path, model_dir, workdir):
    """Measure one variant; returns its result row."""
    n = args.warmup + args.steps
    gpu = args.device.startswith("cuda")
    gc.collect()  # the previous variant's Brain and model (reference cycles) go now
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    overrides, run_opts = ({}, {}) if variant == "hf" else VARIANTS[variant]
    if overrides.get("lora") == FAMILY_LORA:
        overrides = dict(overrides, lora=next(iter(family.lora_parts)))
    out = Path(workdir) / "runs" / f"{args.model}_{variant}"
    exp = experiment_for(args, yaml_path, {**base_overrides(args, family, model_dir),
                                           **args.set, **overrides}, run_opts, out)
    batches = train_batches(exp, n + 1)  # + 1: the FLOP-counting step
    hp = exp.brain.hparams

    def padding(batch):
        return padding_fraction(batch, getattr(hp, "bucket_ratio", None), hp.sample_rate)
    row = {"run": args.run_id, "model": args.model, "variant": variant, "set": args.set,
           "device": device_name(args.device), "data": args.data, "steps": args.steps,
           "utterances_per_batch": sum(len(b.id) for b in batches[1:]) / n,
           "speech_s_per_batch": sum(map(speech_seconds, batches[1:])) / n,
           "padding_mean": float(np.mean([padding(b) for b in batches[1:]])),
           "padding_max": max(padding(b) for b in batches[1:])}
    counted = batches[0]
    if variant == "hf":
        step, inputs, row["attention"], model = hf_step_fn(exp, args)
        prepared = [inputs(b) for b in batches]
        flops = count_flops(step, prepared[0])
        by_id = {id(p): b for p, b in zip(prepared, batches, strict=True)}
        seconds, speech, warm, done = timed(step, prepared[1:], args.warmup, args.device,
                                            speech=lambda p: speech_seconds(by_id[id(p)]))
        done = [by_id[id(p)] for p in done]
        if args.profile:
            profile_table(step, prepared[1:4], args.device,
                          Path(args.out) / f"profile_{args.model}_{variant}.txt")
        del model, prepared
    else:
        torch._dynamo.reset()  # this variant's compiles only, counted from zero
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT  # bucket_ratio raises it
        counters.clear()
        step = recipe_step_fn(exp)
        if "encoder_cache" in overrides:
            timed(step, batches[1:], 0, args.device)  # the first epoch fills the cache
            counted = batches[1]  # count a step that reads the cache, like the timed ones
        flops = None if run_opts.get("compile") else count_flops(step, counted)
        if run_opts.get("compile"):  # an untimed pass compiles every shape of these batches
            row["first_pass_s"] = timed(step, batches[1:], 0, args.device)[0]
            row["graphs"] = counters["stats"]["unique_graphs"]  # each graph break adds one
        # the live loader feeds the timed pass, as in training (same batches, same order)
        seconds, speech, warm, done = timed(step, itertools.islice(train_loader(exp), 1, n + 1),
                                            args.warmup, args.device)
        if args.profile:
            profile_table(step, batches[1:4], args.device,
                          Path(args.out) / f"profile_{args.model}_{variant}.txt")
        row["host_syncs_3_steps"], row["sync_sites"] = host_syncs(step, batches[1:4], args.device)
        row["attention"] = overrides.get("attention", "-")
        row["compile"] = bool(run_opts.get("compile"))
        if row["compile"]:  # graphs compiled in the timed pass: shapes the first pass lacked
            row["timed_graphs"] = counters["stats"]["unique_graphs"] - row["graphs"]
        row["loader_speech_s_per_s"] = loader_throughput(exp, n)
    timed_batches = done
    row["audio_s_per_s"] = speech / seconds
    row["step_ms"] = 1000 * seconds / args.steps
    row["warmup_s"] = warm
    if flops is not None:
        size = family.padded_size
        scale = sum(size(b) for b in timed_batches) / size(counted)
        row["tflops"] = flops * scale / seconds / 1e12
        row["gflop_per_speech_s"] = flops * scale / speech / 1e9
        peak = peak_flops(args.device)
        row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    if "loader_speech_s_per_s" in row:
        row["loader_ratio"] = row["loader_speech_s_per_s"] / row["audio_s_per_s"]
    return row


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------- report
COLUMNS = [("model", "{}"), ("variant", "{}"), ("device", "{}"), ("data", "{}"),
           ("speech_s_per_batch", "{:.0f}"), ("audio_s_per_s", "{:.1f}"), ("vs_hf", "{:.2f}x"),
           ("step_ms", "{:.0f}"), ("tflops", "{:.1f}"), ("mfu", "{:.1%}"), ("peak_gib", "{:.1f}"),
           ("padding_mean", "{:.1%}"), ("loader_ratio", "{:.1f}x"), ("warmup_s", "{:.1f}"),
           ("graphs", "{}"), ("first_pass_s", "{:.1f}"), ("timed_graphs", "{}"),
           ("host_syncs_3_steps", "{}")]


def markdown(rows):
    """All results as a Markdown table; ``vs_hf`` against the ``hf`` row of the same invocation
    (``run``) and model."""
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        ref = next((r for r in rows if r["variant"] == "hf" and all(
            r[k] == row[k] for k in ("run", "model"))), None)
        row = dict(row, vs_hf=row["audio_s_per_s"] / ref["audio_s_per_s"] if ref else None)
        cells = [fmt.format(row[c]) if row.get(c) is not None else "-" for c, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _key_value(item):
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--variants", default=None,
                   help="comma-separated: hf, eager, sdpa, sdpa+compile (CTC); hf, recipe, "
                        "recipe+compile, cache (Whisper); lora, gc, lora+gc (both). Default: "
                        "the family's benchmark_variants")
    p.add_argument("--data", choices=["bundled", "librispeech-like"], default=None,
                   help="default: bundled for the tiny models, librispeech-like otherwise")
    p.add_argument("--utterances", type=int, default=400, help="librispeech-like corpus size")
    p.add_argument("--duration_mean", type=float, default=LIBRISPEECH_LIKE["mean"],
                   help="librispeech-like: mean target duration (s); whole utterances fill "
                        "each target, so the result is about 1.2 s longer")
    p.add_argument("--duration_sd", type=float, default=LIBRISPEECH_LIKE["sd"],
                   help="librispeech-like: spread of the durations (s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--batch_seconds", type=float, default=None,
                   help="CTC: audio s per batch (default 200; the recipe's for tiny models)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="Whisper: utterances per batch (default 32; the recipe's for tiny ones)")
    p.add_argument("--num_workers", type=int, default=None, help="default: the recipe's")
    p.add_argument("--augment", action="store_true", help="keep the recipe's augmentation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a yaml override for every variant (repeatable), e.g. label_smoothing=0")
    p.add_argument("--no_shape_warmup", action="store_true",
                   help="skip the untimed first pass that warms cuDNN for every batch shape")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table of 3 steps per recipe variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "speechtune_bench"))
    p.add_argument("--out", default="benchmark_results")
    args = p.parse_args(argv)
    args.run_id = time.strftime("%Y-%m-%d %H:%M:%S")
    args.set = dict(_key_value(item) for item in args.set)
    logging.basicConfig(level=logging.WARNING)

    yaml_path, config = MODELS[args.model]
    family = yaml_family(REPO / "recipes" / yaml_path)
    tiny = config is None
    args.data = args.data or ("bundled" if tiny else "librispeech-like")
    if not tiny:  # the reference batches: 16 x 12.5 s (CTC), 32 windows (Whisper)
        args.batch_seconds = args.batch_seconds or 200
        args.batch_size = args.batch_size or 32
    default = list(family.benchmark_variants)
    if args.model == "wav2vec2-large":
        default = ["hf", "recipe"]
    variants = args.variants.split(",") if args.variants else default
    for v in variants:
        if v != "hf" and v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from hf, {', '.join(VARIANTS)}")
    workdir = Path(args.workdir)
    if args.data == "bundled":
        args.train_manifest = SYNTHETIC / "en" / "train.csv"
    else:
        args.train_manifest = librispeech_like_corpus(workdir / "data", args.utterances,
                                                      args.duration_mean, args.duration_sd)
    args.valid_manifest = SYNTHETIC / "en" / "valid.csv"
    with open(args.train_manifest, newline="", encoding="utf-8") as f:
        texts = [row["wrd"] for row in csv.DictReader(f)]
    model_dir = None if tiny else build_model(family, config,
                                              workdir / "models" / args.model, texts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_shape_warmup:
        # the first variant of a process pays for cuDNN's plans for every new conv shape (a
        # dynamic batch is a new shape): 4.7x slower on an H100 for the same step run again
        run_variant(args, variants[0], family, yaml_path, model_dir, workdir)
    for variant in variants:
        row = run_variant(args, variant, family, yaml_path, model_dir, workdir)
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in open(out / "results.jsonl", encoding="utf-8")]
    (out / "results.md").write_text(markdown(rows), encoding="utf-8")
    print(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
