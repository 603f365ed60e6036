"""Export of a CTC run (``speechtune.export`` calls it through ``CTCFamily.export``).

transformers files: ``config.json`` + ``model.safetensors`` of a ``*ForCTC`` model (WavLM,
wav2vec2, HuBERT; the CTC head as ``lm_head``) with its processor (feature extractor and a
``Wav2Vec2CTCTokenizer`` whose ``<pad>`` is the CTC blank and ``|`` the space). CTC on Whisper's
encoder has no transformers class: its folder holds the encoder alone (``encoder.*``,
``speechtune.whisper_models``) for SpeechBrain. SpeechBrain files: ``hyperparams.yaml`` for
``speechbrain.inference.ASR.EncoderASR`` (encoder + ``head.ckpt`` + ``tokenizer.ckpt``, greedy
decoding). A LoRA run's adapters are merged into the encoder's weights (``speechtune.adapters``).
"""

import json

import torch
from speechbrain.dataio.encoder import CTCTextEncoder
from transformers import (
    AutoConfig,
    AutoModelForCTC,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING

from speechtune import adapters
from speechtune.checkpoints import load_state
from speechtune.models import SSLEncoder
from speechtune.whisper_models import WhisperEncoder

SB_BLANK, HF_BLANK, HF_SPACE = "<blank>", "<pad>", "|"
#: encoder wrappers that write their encoder alone, by HF model type (no transformers CTC class)
ENCODER_ONLY_EXPORTS = {"whisper": WhisperEncoder}


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


def merged_encoder_state(save, config, lora, adapter_state):
    """A LoRA run's encoder state: the source model's weights (``lora["base"]``, rebuilt in the
    run's wrapper) with the checkpoint's adapters merged into them."""
    base = dict(lora["base"])
    wrapper = ENCODER_ONLY_EXPORTS.get(config.model_type, SSLEncoder)(
        base.pop("source"), str(save / "hf_cache"), freeze=True, **base)
    wrapper.model = adapters.merge(
        wrapper.model, lora, {k.removeprefix("model."): v for k, v in adapter_state.items()})
    return wrapper.state_dict()


def export_ctc(save, ckpts, info, out):
    """SpeechBrain ``EncoderASR`` files in ``out``, and transformers ``*ForCTC`` + processor
    where transformers has a CTC class for the encoder (WavLM, wav2vec2, HuBERT; not Whisper's
    encoder, whose export is SpeechBrain's only: ``None`` is returned for its class)."""
    encoder_state, head_state = load_state(ckpts, "encoder"), load_state(ckpts, "head")
    sb_tokenizer, vocab = ctc_vocabulary(save / "label_encoder.txt", info["blank_index"])
    config = AutoConfig.from_pretrained(save / "model_files")
    if info.get("lora"):
        encoder_state = merged_encoder_state(save, config, info["lora"], encoder_state)
    if type(config) not in MODEL_FOR_CTC_MAPPING:  # the run's wrapper writes its encoder alone
        if config.model_type not in ENCODER_ONLY_EXPORTS:
            raise SystemExit(f"transformers has no CTC class for a {config.model_type} encoder, "
                             "and speechtune no encoder-only export for it")
        ssl = ENCODER_ONLY_EXPORTS[config.model_type].export_encoder(
            encoder_state, save / "model_files", out)
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
