"""Export a run's checkpoint to a self-contained folder that loads offline two ways.

The folder holds, side by side:

- transformers files: ``config.json`` + ``model.safetensors`` of a ``*ForCTC`` model (WavLM,
  wav2vec2, HuBERT; the CTC head as ``lm_head``) or of ``WhisperForConditionalGeneration``, with
  its processor (feature extractor + tokenizer; for CTC a ``Wav2Vec2CTCTokenizer`` whose ``<pad>``
  is the CTC blank and ``|`` the space) and, for Whisper, a generation config that writes the
  run's language and task. CTC on Whisper's encoder has no transformers class: its folder holds
  the encoder alone (``encoder.*``, ``speechtune.whisper_models``) for SpeechBrain, and its
  card says that transformers does not load it;
- SpeechBrain files: ``hyperparams.yaml`` for ``speechbrain.inference.ASR.EncoderASR`` (CTC:
  encoder + ``head.ckpt`` + ``tokenizer.ckpt``, greedy decoding) or ``WhisperASR`` (the run's
  test beam search). The encoder wrappers are speechtune's (per-utterance normalisation, the
  model's own Whisper window), so ``speechtune`` must be installed where the folder is loaded.
  ``hyperparams.yaml`` names the folder in ``export_folder``; load a moved folder with
  ``load_asr(folder)`` (or pass ``overrides={"export_folder": folder}``);
- ``README.md``: a model card (source run, checkpoint(s), valid/test WER, the commands).

What is exported is the best-WER checkpoint, a chosen one, or the average of the ``average``
best (SpeechBrain's ``average_checkpoints``). The run's own ``run.json`` and ``save/model_files``
(written by ``speechtune.recipe`` at training start) supply the model's config and inference
settings, so neither the recipe's yaml nor the hub is needed.
"""

import atexit
import json
import re
import shlex
import shutil
import tempfile
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.utils.checkpoints import Checkpointer, average_checkpoints

from speechtune.model_card import model_card
from speechtune.models import whisper_special_tokens

SB_BLANK, HF_BLANK, HF_SPACE = "<blank>", "<pad>", "|"


# ---------------------------------------------------------------------------- the run
def read_run(run):
    """``(output folder, save folder, run.json contents)`` of a run's output folder."""
    out = Path(run)
    if out.name == "save":
        out = out.parent
    info_path, save = out / "run.json", out / "save"
    if not info_path.is_file() or not (save / "model_files").is_dir():
        raise SystemExit(
            f"{out} has no run.json / save/model_files: give a run's output folder (the one "
            "holding save/), of a run trained by this speechtune version (older runs: rerun "
            "their train.py command once; it resumes, writes both and only tests)")
    return out, save, json.loads(info_path.read_text(encoding="utf-8"))


def select_checkpoints(save, checkpoint=None, average=1):
    """The checkpoints to export: ``checkpoint`` (a CKPT+... name or path), else the ``average``
    best by valid WER (the best alone for 1)."""
    checkpointer = Checkpointer(save)
    if checkpoint is not None:
        wanted = Path(checkpoint).name
        found = [c for c in checkpointer.list_checkpoints() if c.path.name == wanted]
        if not found:
            raise SystemExit(f"no checkpoint {wanted} in {save}: see tools/checkpoints.py list")
        return found
    # the Checkpointer's own choice: the checkpoint(s) train.py tests, ties broken alike
    found = checkpointer.find_checkpoints(min_key="WER", max_num_checkpoints=average)
    if not found:
        raise SystemExit(f"no checkpoint in {save} has a valid WER yet: let the run validate")
    if len(found) < average:
        raise SystemExit(f"--average {average} but {save} holds {len(found)} checkpoint(s) "
                         "with a valid WER: lower it, or keep more (num_to_keep in the yaml)")
    return found


def load_state(ckpts, name):
    """The ``name`` recoverable's state dict, averaged over ``ckpts`` when several."""
    if len(ckpts) == 1:
        return torch.load(ckpts[0].paramfiles[name], map_location="cpu")
    return average_checkpoints(ckpts, name,
                               parameter_loader=partial(torch.load, map_location="cpu"))


# ---------------------------------------------------------------------------- CTC
def ctc_vocabulary(label_encoder_file, blank_index):
    """The run's character vocabulary in index order, as the HF tokenizer writes it: the CTC
    blank as ``<pad>``, the space as ``|``."""
    encoder = CTCTextEncoder()
    encoder.load(label_encoder_file)
    labels = [encoder.ind2lab[i] for i in range(len(encoder.ind2lab))]
    if labels[blank_index] != SB_BLANK:
        raise ValueError(f"{label_encoder_file}: index {blank_index} is {labels[blank_index]!r}, "
                         "not the CTC blank")
    for taken in (HF_BLANK, HF_SPACE):
        if taken in labels:
            raise ValueError(f"{label_encoder_file}: the vocabulary holds {taken!r}, which the "
                             "transformers CTC tokenizer reserves (blank / word delimiter)")
    hf = {SB_BLANK: HF_BLANK, " ": HF_SPACE}
    return encoder, [hf.get(label, label) for label in labels]


def export_ctc(save, ckpts, info, out):
    """SpeechBrain ``EncoderASR`` files in ``out``, and transformers ``*ForCTC`` + processor
    where transformers has a CTC class for the encoder (WavLM, wav2vec2, HuBERT; not Whisper's
    encoder, whose export is SpeechBrain's only: ``None`` is returned for its class)."""
    from transformers import (
        AutoConfig,
        AutoModelForCTC,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Processor,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING

    encoder_state, head_state = load_state(ckpts, "encoder"), load_state(ckpts, "head")
    sb_tokenizer, vocab = ctc_vocabulary(save / "label_encoder.txt", info["blank_index"])
    config = AutoConfig.from_pretrained(save / "model_files")
    if type(config) not in MODEL_FOR_CTC_MAPPING:  # the run's wrapper writes its encoder alone
        ssl = _encoder_class(info, config).export_encoder(encoder_state, save / "model_files", out)
        model_class = None
    else:
        config.update({"vocab_size": len(vocab), "pad_token_id": info["blank_index"],
                       "ctc_loss_reduction": "mean", "ctc_zero_infinity": True})
        model = AutoModelForCTC.from_config(config)
        model.base_model.load_state_dict({k.removeprefix("model."): v
                                          for k, v in encoder_state.items()})
        model.lm_head.load_state_dict({"weight": head_state["w.weight"],
                                       "bias": head_state["w.bias"]})
        model.save_pretrained(out)
        (out / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(vocab)},
                                                   ensure_ascii=False))
        tokenizer = Wav2Vec2CTCTokenizer(str(out / "vocab.json"),
                                         unk_token=getattr(sb_tokenizer, "unk_label", "<unk>"),
                                         pad_token=HF_BLANK, word_delimiter_token=HF_SPACE,
                                         bos_token=None, eos_token=None)
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(save / "model_files")
        Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
        ssl, model_class = SSL_ENCODER, type(model).__name__

    torch.save(head_state, out / "head.ckpt")
    sb_tokenizer.save(out / "tokenizer.ckpt")
    (out / "hyperparams.yaml").write_text(f"""\
# SpeechBrain inference: speechbrain.inference.ASR.EncoderASR (greedy CTC decoding).
# Load with speechtune.export.load_asr(folder) or, from this folder's place,
# EncoderASR.from_hparams(source=folder, savedir=<any folder>)
export_folder: {json.dumps(str(out.resolve()))}   # this folder (load_asr overrides it)
sample_rate: {info["sample_rate"]}
ssl: {ssl}head: !new:speechbrain.nnet.linear.Linear
    input_size: {config.hidden_size}
    n_neurons: {len(vocab)}
log_softmax: !new:speechbrain.nnet.activations.Softmax
    apply_log: True
encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    ssl: !ref <ssl>
    head: !ref <head>
    log_softmax: !ref <log_softmax>
tokenizer: !new:speechbrain.dataio.encoder.CTCTextEncoder
decoding_function: !name:speechbrain.decoders.ctc_greedy_decode
    blank_id: {info["blank_index"]}
modules:
    encoder: !ref <encoder>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        head: !ref <head>
        tokenizer: !ref <tokenizer>
""", encoding="utf-8")
    return model_class


SSL_ENCODER = """!new:speechtune.models.SSLEncoder   # per-utterance normalisation, as in training
    source: !ref <export_folder>
    save_path: !ref <export_folder>
    freeze: True
    freeze_feature_extractor: True
    apply_spec_augment: False
    output_norm: False
"""


def _encoder_class(info, config):
    """The run's encoder wrapper (``run.json``'s ``encoder``), if it can write its encoder alone
    (``export_encoder``): the export of a model transformers has no CTC class for."""
    import importlib

    module, _, name = info.get("encoder", "").rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if module else None
    if not hasattr(cls, "export_encoder"):
        raise SystemExit(f"transformers has no CTC class for a {config.model_type} encoder and "
                         f"the run's encoder wrapper ({info.get('encoder')}) cannot export one")
    return cls


# ---------------------------------------------------------------------------- Whisper
def export_whisper(save, ckpts, info, out):
    """transformers ``WhisperForConditionalGeneration`` + processor + generation config, and
    SpeechBrain ``WhisperASR`` files, in ``out``."""
    from transformers import (
        AutoConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    # the wrapper's own buffers (its mel filterbank) are not model weights
    state = {k: v for k, v in load_state(ckpts, "whisper").items() if k.startswith("model.")}
    files = save / "model_files"
    model = WhisperForConditionalGeneration(AutoConfig.from_pretrained(files))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"proj_out.weight"}:
        raise ValueError(f"whisper checkpoint does not fit {files}/config.json: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()  # the output projection is the token embedding, as in training
    tokenizer = WhisperTokenizer.from_pretrained(files)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor.from_pretrained(files),
                                 tokenizer=tokenizer)
    _generation_config(model, tokenizer, info)
    model.save_pretrained(out)
    processor.save_pretrained(out)

    search = info["test_search"]
    searcher = "S2SWhisperBeamSearcher" if search["beam_size"] > 1 else "S2SWhisperGreedySearcher"
    lines = [f"    {k}: {json.dumps(v)}" for k, v in search.items()
             if searcher.endswith("BeamSearcher") or k not in (
                 "beam_size", "length_normalization", "using_eos_threshold", "eos_threshold")]
    target = "module: [!ref <whisper>]" if searcher.endswith("BeamSearcher") else \
        "model: !ref <whisper>"
    (out / "hyperparams.yaml").write_text(f"""\
# SpeechBrain inference: speechbrain.inference.ASR.WhisperASR (the run's test search).
# Load with speechtune.export.load_asr(folder) or, from this folder's place,
# WhisperASR.from_hparams(source=folder, savedir=<any folder>)
export_folder: {json.dumps(str(out.resolve()))}   # this folder (load_asr overrides it)
sample_rate: {info["sample_rate"]}
language: {info["language"]}
whisper: !new:speechtune.whisper_models.Whisper   # the model's own input window, as in training
    source: !ref <export_folder>
    save_path: !ref <export_folder>
    language: !ref <language>
    task: {info["task"]}
    freeze: True
decoder: !new:speechbrain.decoders.seq2seq.{searcher}
    {target}
{chr(10).join(lines)}
normalized_transcripts: False
modules:
    whisper: !ref <whisper>
    decoder: !ref <decoder>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables: {{}}
""", encoding="utf-8")
    return type(model).__name__


def _generation_config(model, tokenizer, info):
    """Make ``generate`` write what the recipe's searcher writes: the language and task prefix,
    no timestamps, the tokens it suppresses (none for runs recorded before the searcher's
    suppression was)."""
    config = model.generation_config
    # a tokenizer without a token (whisper-small has no <|yue|>) maps it to unk: leave it out
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in whisper_special_tokens()}
    specials = {t: i for t, i in specials.items() if i != tokenizer.unk_token_id}
    config.lang_to_id = {t: i for t, i in specials.items()
                         if t.strip("<|>") in _language_codes()}
    config.task_to_id = {task: specials[f"<|{task}|>"] for task in ("transcribe", "translate")
                         if f"<|{task}|>" in specials}
    config.is_multilingual = bool(model.config.vocab_size >= 51865)
    config.no_timestamps_token_id = specials.get("<|notimestamps|>")
    config.decoder_start_token_id = model.config.decoder_start_token_id
    suppress = info.get("suppress", {})
    config.suppress_tokens = suppress.get("tokens", [])
    config.begin_suppress_tokens = suppress.get("begin", [])
    if config.is_multilingual:
        config.language, config.task = info["language"], info["task"]
    config.num_beams = info["test_search"]["beam_size"]
    config.max_length = model.config.max_target_positions
    config._from_model_config = False  # else generate() rebuilds it from the model config


def _language_codes():
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return set(LANGUAGES)


# ---------------------------------------------------------------------------- entry points
def export(run, out, checkpoint=None, average=1, force=False):
    """Export ``run`` (its output folder) to ``out``; returns a summary dict for the card."""
    run_folder, save, info = read_run(run)
    ckpts = select_checkpoints(save, checkpoint, average)
    out = Path(out)
    if out.exists():
        if not force:
            raise SystemExit(f"{out} exists: pass --force to replace it, or another folder")
        if any(out.iterdir()) and not (out / "speechtune_export.json").is_file():
            raise SystemExit(f"{out} is not an earlier export (no speechtune_export.json): "
                             "--force replaces only those; choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    exporter = {"ctc": export_ctc, "whisper": export_whisper}[info["family"]]
    model_class = exporter(save, ckpts, info, out)
    summary = {"run": str(run_folder.resolve()), "family": info["family"],
               "model_class": model_class, "language": info["language"],
               "sample_rate": info["sample_rate"],
               "checkpoints": [{"name": c.path.name, "WER": c.meta.get("WER"),
                                "CER": c.meta.get("CER"), "epoch": c.meta.get("epoch"),
                                "step": c.meta.get("step")} for c in ckpts],
               "train_command": shlex.join(["cd", info["cwd"]]) + " && " + shlex.join(
                   ["python", Path(info["script"]).name,
                    *(a for a in info["argv"] if not a.startswith("--average_best"))]),
               "test": _test_results(run_folder, ckpts),
               "exported": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    (out / "speechtune_export.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (out / "README.md").write_text(model_card(summary, out), encoding="utf-8")
    return summary


def _test_results(run_folder, ckpts):
    """The run's latest logged result per split for what is exported: the best-WER checkpoint's
    lines (no ``averaged``) or those of the same average; none for another checkpoint."""
    log = run_folder / "train_log.txt"
    best = Checkpointer(ckpts[0].path.parent).find_checkpoint(min_key="WER")
    if not log.is_file() or (len(ckpts) == 1 and (best is None or ckpts[0].path != best.path)):
        return []
    names = {c.path.name for c in ckpts}
    latest = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        found = re.search(r"split: (\w+)(?:, averaged: (.+?))? - ", line)
        if not found:
            continue
        averaged = set(found[2].split(" + ")) if found[2] else None
        if (averaged is None and len(ckpts) == 1) or averaged == names:
            latest[found[1]] = line.strip()
    return list(latest.values())


def load_asr(folder, savedir=None, device="cpu"):
    """The exported ``folder`` as a SpeechBrain inference object (``EncoderASR`` for CTC,
    ``WhisperASR`` for Whisper), wherever the folder now is.

    ``savedir`` is where SpeechBrain links the files it loads; by default a temporary folder
    removed at exit, since links left from an earlier load would point at a folder's old place.
    """
    from speechbrain.inference.ASR import EncoderASR, WhisperASR

    folder = Path(folder).resolve()
    marker = folder / "speechtune_export.json"
    if not marker.is_file():
        raise SystemExit(f"{folder} is not a speechtune export (no speechtune_export.json): "
                         "write one with python tools/checkpoints.py export RUN FOLDER")
    family = json.loads(marker.read_text())["family"]
    cls = EncoderASR if family == "ctc" else WhisperASR
    if savedir is None:
        savedir = tempfile.mkdtemp(prefix="speechtune_load_")
        atexit.register(shutil.rmtree, savedir, ignore_errors=True)
    asr = cls.from_hparams(source=str(folder), savedir=str(savedir),
                           overrides={"export_folder": str(folder)},
                           run_opts={"device": device})
    if family == "ctc":  # the vocabulary was saved whole: say so (SpeechBrain warns otherwise)
        asr.tokenizer.expect_len(len(asr.tokenizer.lab2ind))
    return asr
