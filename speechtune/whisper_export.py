"""Export of a Whisper run (``speechtune.export`` calls it through ``WhisperFamily.export``):
transformers ``WhisperForConditionalGeneration`` + processor + a generation config that writes
the run's language and task and suppresses what its searcher suppresses, and SpeechBrain
``WhisperASR`` files (the run's test search). A LoRA run's adapters are merged into the weights
(``speechtune.adapters``) and also written to ``adapter/`` for ``peft.PeftModel.from_pretrained``
on the base model.
"""

import json

from transformers import (
    AutoConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from speechtune import adapters
from speechtune.checkpoints import load_state
from speechtune.tiny import whisper_special_tokens
from speechtune.whisper_models import Whisper


def export_whisper(save, ckpts, info, out):
    """transformers ``WhisperForConditionalGeneration`` + processor + generation config, and
    SpeechBrain ``WhisperASR`` files, in ``out``."""
    state = load_state(ckpts, "whisper")
    lora = info.get("lora")
    if lora:  # the checkpoints hold the adapters; the frozen weights are the source model's
        adapter_state, base = state, dict(lora["base"])
        state = Whisper(base.pop("source"), str(save / "hf_cache"), freeze=True,
                        **base).state_dict()
    # the wrapper's own buffers (its mel filterbank) are not model weights
    state = {k: v for k, v in state.items() if k.startswith("model.")}
    files = save / "model_files"
    model = WhisperForConditionalGeneration(AutoConfig.from_pretrained(files))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"proj_out.weight"}:
        raise ValueError(f"whisper checkpoint does not fit {files}/config.json: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()  # the output projection is the token embedding, as in training
    if lora:
        model = adapters.merge(model, lora, adapter_state, adapter_folder=out / "adapter")
        model.tie_weights()
    tokenizer = WhisperTokenizer.from_pretrained(files)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor.from_pretrained(files),
                                 tokenizer=tokenizer)
    _generation_config(model, tokenizer, info)
    model.save_pretrained(out)
    processor.save_pretrained(out)

    search = info["test_search"]
    searcher = "speechtune.whisper_models.WhisperBeamSearcher" if search["beam_size"] > 1 else \
        "speechbrain.decoders.seq2seq.S2SWhisperGreedySearcher"
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
decoder: !new:{searcher}
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
                         if t.strip("<|>") in LANGUAGES}
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
