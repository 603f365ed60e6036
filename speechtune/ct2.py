"""CTranslate2 / faster-whisper Whisper folders to transformers folders.

A CTranslate2 Whisper folder holds ``model.bin`` (a ``WhisperSpec``: named float16 or float32
arrays), ``config.json`` (language ids, suppressed tokens, alignment heads), ``tokenizer.json``
and ``vocabulary.json``. ``convert_ct2_whisper`` writes what ``openai/whisper-*`` has on the
hub: ``WhisperForConditionalGeneration`` weights in float32 (lossless from float16), its config,
the generation config (language and task ids, no-timestamps id, suppressed and begin-suppressed
tokens, alignment heads), the tokenizer with ``<|endoftext|>`` as pad, bos, eos and unk, and the
feature extractor: the folder's ``preprocessor_config.json`` if it has one (faster-whisper's file;
it holds the encoder window of a model whose position table is cut, as ``speechtune.ct2_export``
writes them), else Whisper's 30 s one. Quantised models (int8, int16 weights) are refused: their
weights cannot be restored exactly. The writer side is CTranslate2's own ``TransformersConverter``
(``speechtune.ct2_export``).

``model.bin`` layout (CTranslate2's format version 6, little-endian): ``<u32 version>``
``<str spec name>`` ``<u32 spec revision>`` ``<u32 n>``, then per variable ``<str name>``
``<u8 rank>`` ``<u32 dim> x rank`` ``<u8 dtype>`` ``<u32 nbytes>`` data; then ``<u32 n>``
alias pairs ``<str alias> <str target>``. A ``<str>`` is ``<u16 length>`` and that many bytes,
the last a NUL.
"""

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

# CTranslate2's DataType enum
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
FLOAT_DTYPES = (np.float32, np.float16)
#: the files of a CTranslate2 Whisper folder this reads (vocabulary.json: the same tokens)
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
#: the feature extractor's file, which faster-whisper reads too (the encoder window)
PREPROCESSOR_FILE = "preprocessor_config.json"


class CT2FormatError(ValueError):
    """A folder or file that is not a convertible CTranslate2 Whisper model."""


def read_ct2_model(path):
    """``(spec name, {variable name: numpy array})`` of a CTranslate2 ``model.bin``; aliases
    (e.g. the tied output projection) point to the same array as their target."""
    with open(path, "rb") as f:
        def u32():
            return struct.unpack("<I", f.read(4))[0]

        def string():
            (length,) = struct.unpack("<H", f.read(2))
            return f.read(length)[:-1].decode("utf-8")

        version = u32()
        if version < 5:
            raise CT2FormatError(f"{path}: CTranslate2 model format version {version}; this "
                                 "converter reads versions 5 and later (re-convert the model "
                                 "with a current ctranslate2)")
        spec = string()
        u32()  # the spec's revision
        variables = {}
        for _ in range(u32()):
            name = string()
            dims = [u32() for _ in range(f.read(1)[0])]
            dtype_id = f.read(1)[0]
            nbytes = u32()
            if dtype_id not in CT2_DTYPES:  # bfloat16 and newer types
                raise CT2FormatError(f"{path}: variable {name} has CTranslate2 dtype id "
                                     f"{dtype_id}, which this converter does not read; "
                                     "convert the model with --quantization float16 or float32")
            array = np.frombuffer(f.read(nbytes), dtype=CT2_DTYPES[dtype_id])
            variables[name] = array.reshape(dims) if dims else array[0]
        for _ in range(u32()):
            alias, target = string(), string()
            variables[alias] = variables[target]
    return spec, variables


def _check_float(variables, path):
    """Weights must be float16/float32: int8 / int16 models are quantised (lossy)."""
    quantised = sorted(f"{n}: {v.dtype}" for n, v in variables.items()
                       if n.endswith("weight") and v.dtype not in FLOAT_DTYPES)
    quantised += sorted(n for n in variables if n.endswith("weight_scale"))
    if quantised:
        raise CT2FormatError(
            f"{path} is a quantised CTranslate2 model ({quantised[0]}): int8/int16 "
            "weights cannot be turned back into the original ones. Use a float16 or float32 "
            "conversion of the model (ct2-transformers-converter --quantization float16).")


def _layers(variables, prefix):
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def _hf_state_dict(v):
    """transformers' ``WhisperForConditionalGeneration`` state dict from CTranslate2 names."""
    def t(name):
        return torch.from_numpy(np.array(v[name], dtype=np.float32))

    sd = {}

    def norm(hf, ct2):
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct2}/gamma"), t(f"{ct2}/beta")

    def linear(hf, ct2):
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct2}/weight"), t(f"{ct2}/bias")

    def split(hf, ct2, names):
        weights = t(f"{ct2}/weight").chunk(len(names))
        biases = t(f"{ct2}/bias").chunk(len(names))
        for name, w, b in zip(names, weights, biases, strict=True):
            sd[f"{hf}.{name}_proj.weight"] = w
            if name != "k":  # Whisper's key projections have no bias (CTranslate2 stores 0)
                sd[f"{hf}.{name}_proj.bias"] = b

    def self_attention(hf, ct2):
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        split(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", "qkv")
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")

    def ffn(hf, ct2):
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")

    enc, dec = "model.encoder", "model.decoder"
    for i in (1, 2):
        linear(f"{enc}.conv{i}", f"encoder/conv{i}")
    sd[f"{enc}.embed_positions.weight"] = t("encoder/position_encodings/encodings")
    for i in range(_layers(v, "encoder")):
        hf, ct2 = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        self_attention(hf, ct2)
        ffn(hf, ct2)
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    sd[f"{dec}.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = t("decoder/position_encodings/encodings")
    for i in range(_layers(v, "decoder")):
        hf, ct2 = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        self_attention(hf, ct2)
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        split(f"{hf}.encoder_attn", f"{ct2}/attention/linear_0", "q")
        split(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", "kv")
        linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        ffn(hf, ct2)
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    if not np.shares_memory(v["decoder/projection/weight"], v["decoder/embeddings/weight"]) \
            and not np.array_equal(v["decoder/projection/weight"], v["decoder/embeddings/weight"]):
        raise CT2FormatError("the decoder's output projection differs from its token embedding: "
                             "not a Whisper model (Whisper ties the two)")
    return sd


def _token_ids(tokenizer_json):
    """``{token: id}`` of the tokenizer's added (special) tokens."""
    return {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}


def _configs(v, ct2_config, tokenizer_json):
    """transformers' ``WhisperConfig`` and ``GenerationConfig`` for the model."""
    from transformers import GenerationConfig, WhisperConfig

    ids = _token_ids(tokenizer_json)
    id_to_token = {i: tok for tok, i in ids.items()}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    d_model = v["encoder/conv1/weight"].shape[0]
    lang_ids = list(ct2_config.get("lang_ids", []))
    suppress = list(ct2_config.get("suppress_ids", []))
    begin_suppress = list(ct2_config.get("suppress_ids_begin", []))
    config = WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_layers(v, "encoder"), decoder_layers=_layers(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        suppress_tokens=suppress, begin_suppress_tokens=begin_suppress, tie_word_embeddings=True,
    )
    multilingual = bool(lang_ids)
    generation = {
        "decoder_start_token_id": sot, "bos_token_id": eot, "eos_token_id": eot,
        "pad_token_id": eot, "max_length": config.max_target_positions,
        "suppress_tokens": suppress, "begin_suppress_tokens": begin_suppress,
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids.get("<|startofprev|>"),
        "is_multilingual": multilingual, "return_timestamps": False,
        "max_initial_timestamp_index": 50,
        "alignment_heads": [list(h) for h in ct2_config.get("alignment_heads", [])],
    }
    if multilingual:
        generation["lang_to_id"] = {id_to_token[i]: i for i in lang_ids}
        generation["task_to_id"] = {"transcribe": ids["<|transcribe|>"],
                                    "translate": ids["<|translate|>"]}
        generation["forced_decoder_ids"] = [[1, None], [2, ids["<|transcribe|>"]]]
    else:
        generation["forced_decoder_ids"] = [[1, ids["<|notimestamps|>"]]]
    return config, GenerationConfig(**generation)


def _tokenizer(tokenizer_file):
    """Whisper's tokenizer from ``tokenizer.json``, with the hub's special-token settings."""
    from transformers import WhisperTokenizerFast

    eot = "<|endoftext|>"
    return WhisperTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=eot,
                                eos_token=eot, unk_token=eot, pad_token=eot)


def check_window(extractor, config, where):
    """A ``WhisperFeatureExtractor`` must pad to the frames the encoder's position table covers
    (CTranslate2 refuses longer features and gives shorter ones fewer positions than in
    training); ``where`` names the folder in the error."""
    if extractor.nb_max_frames != 2 * config.max_source_positions:  # conv2 halves the frames
        raise CT2FormatError(
            f"{where}: the feature extractor pads to {extractor.nb_max_frames} mel frames "
            f"({extractor.chunk_length} s) but the encoder has {config.max_source_positions} "
            f"positions (one per 2 frames): write the model's window into its "
            f"{PREPROCESSOR_FILE} (chunk_length, n_samples, nb_max_frames)")


def _feature_extractor(source, config):
    """The folder's feature extractor (its window), else Whisper's own 30 s one."""
    from transformers import WhisperFeatureExtractor

    if not (source / PREPROCESSOR_FILE).is_file():
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    else:
        extractor = WhisperFeatureExtractor.from_pretrained(source)
    check_window(extractor, config, source)
    return extractor


def convert_ct2_whisper(source, target):
    """Convert the CTranslate2 Whisper folder ``source`` into a transformers folder ``target``.

    ``target`` is written atomically (a temporary folder beside it, renamed when complete); an
    existing ``target`` is replaced. Returns ``target`` as a string.
    """
    from transformers import WhisperForConditionalGeneration

    source, target = Path(source), Path(target)
    missing = [n for n in REQUIRED_FILES if not (source / n).is_file()]
    if missing:
        raise CT2FormatError(f"{source} is not a CTranslate2 Whisper folder: no "
                             f"{', '.join(missing)}")
    spec, variables = read_ct2_model(source / "model.bin")
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{source}/model.bin holds a {spec}, not a WhisperSpec")
    _check_float(variables, source / "model.bin")
    ct2_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    config, generation = _configs(variables, ct2_config, tokenizer_json)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = _hf_state_dict(variables)
    expected = set(model.state_dict()) - {"proj_out.weight"}
    if set(state) != expected:
        raise CT2FormatError(f"{source}/model.bin does not map onto transformers' Whisper: "
                             f"missing {sorted(expected - set(state))[:5]}, unexpected "
                             f"{sorted(set(state) - expected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.generation_config = generation
    extractor = _feature_extractor(source, config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        _tokenizer(source / "tokenizer.json").save_pretrained(tmp)
        extractor.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
