"""Parameter-efficient fine-tuning: LoRA adapters (``peft``) and gradient checkpointing on a
family's transformers model, and what follows for checkpoints and export.

Why ``peft`` rather than SpeechBrain's ``speechbrain.nnet.adapters``: peft is what an export's
users load adapters with (``PeftModel.from_pretrained``), its ``merge_and_unload`` writes plain
transformers weights, and its LoRA layers are the ones Hugging Face's Whisper LoRA recipes train.

LoRA (``lora`` in the yaml, off by default) puts low-rank adapters beside the linear layers named
by ``lora_targets`` (default: the attention's ``q_proj`` and ``v_proj``; ``all-linear``: every
linear layer) in each transformer layer of the part ``lora`` names (``speechtune.family``'s
``lora_parts``: Whisper's ``decoder``, ``encoder`` or ``both``; the SSL encoder's transformer for
CTC). Every weight of the transformers model then stays as loaded; only the adapters train (and,
outside the model, a CTC head). ``lora_alpha / lora_rank`` scales the adapters' output.

A module holding adapters is checkpointed by what trains in it (``save_trainable``): its adapters,
a few MB, where the whole module is hundreds. Its frozen weights are the source model's, which a
resumed run loads again and an export rebuilds from ``run.json``'s ``lora.base`` record; the export
merges the adapters into plain weights (``merge``).

``gradient_checkpointing`` (yaml) is transformers' own ``gradient_checkpointing_enable``: a layer's
activations are recomputed in the backward pass instead of kept, with the non-reentrant
implementation, which DDP accepts (SpeechBrain's wrappers turn the reentrant one off "for DDP").
"""

import re

import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

ALL_LINEAR = "all-linear"


def lora_config(hparams, model, parts):
    """The ``LoraConfig`` the yaml's ``lora*`` keys ask for on ``model`` (a transformers model),
    or None when ``lora`` is null. ``parts``: ``{lora value: module-name prefixes of the
    transformer layers it adapts}`` (the family's)."""
    where = hparams["lora"]
    if where is None:
        return None
    if where not in parts:
        raise ValueError(f"lora={where!r}: use null (off) or one of {', '.join(parts)}")
    prefixes = parts[where]
    layers = re.compile(rf"(?:.*\.)?(?:{'|'.join(map(re.escape, prefixes))})\.\d+\.(?:.*\.)?")
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and layers.match(name)})
    targets = hparams["lora_targets"]
    if targets == ALL_LINEAR:
        targets = linear
    listed = [targets] if isinstance(targets, str) else list(targets or [])
    unknown = sorted(set(listed) - set(linear))
    if isinstance(targets, str) or not listed or unknown:
        raise ValueError(f"lora_targets={targets!r}: the layers of {', '.join(prefixes)} have "
                         f"the linear layers {linear}{f'; not {unknown}' if unknown else ''}. "
                         f"Give a list of them, or {ALL_LINEAR}.")
    rank, alpha = int(hparams["lora_rank"]), float(hparams["lora_alpha"])
    if rank < 1 or alpha <= 0:
        raise ValueError(f"lora_rank={rank}, lora_alpha={alpha}: both must be positive")
    pattern = layers.pattern + rf"(?:{'|'.join(map(re.escape, sorted(targets)))})"
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(hparams["lora_dropout"]),
                      target_modules=pattern, bias="none")


def adapt(wrapper, hparams, parts, base):
    """Gradient checkpointing and LoRA on ``wrapper.model`` as the yaml asks. Returns run.json's
    ``lora`` record (None without LoRA): the adapters' config and ``base``, what the export
    rebuilds the frozen weights from (``{"source": ..., **wrapper keyword arguments}``)."""
    model = wrapper.model
    if hparams["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = lora_config(hparams, model, parts)
    if config is None:
        return None
    inject_adapter_in_model(config, model)  # adapters train; every other weight of model freezes
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"where": hparams["lora"], "config": config_record(config), "base": base,
            "trainable_parameters": trainable,
            "frozen_parameters": sum(p.numel() for p in model.parameters()) - trainable}


def config_record(config):
    """The ``LoraConfig`` arguments that rebuild ``config`` (run.json)."""
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": config.target_modules, "bias": config.bias}


def is_adapted(module):
    """Whether ``module`` holds LoRA adapters."""
    return any(isinstance(m, LoraLayer) for m in module.modules())


# ---------------------------------------------------------------------------- checkpoints
def trainable_names(module):
    """State-dict names of ``module``'s trainable parameters."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def save_trainable(module, path):
    """Checkpoint saver of a module with adapters: what trains in it, not its frozen weights."""
    names = trainable_names(module)
    torch.save({k: v for k, v in module.state_dict().items() if k in names}, path)


def load_trainable(module, path, end_of_epoch=True):
    """Checkpoint loader matching ``save_trainable``."""
    del end_of_epoch
    load_weights(module, torch.load(path, map_location="cpu"))


def load_weights(module, state):
    """``module.load_state_dict(state)``; for a module with adapters ``state`` holds what trains
    in it, each of those and nothing else (a checkpoint of another LoRA set-up is an error)."""
    if not is_adapted(module):
        return module.load_state_dict(state)
    own = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    resized = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or resized:
        raise ValueError(
            f"the checkpoint's adapters do not fit this run's LoRA set-up (lora, lora_rank, "
            f"lora_targets): missing {missing[:3]}, unexpected {unexpected[:3]}, another shape "
            f"{resized[:3]}. Resume with the settings the run started with, or train into a new "
            "output_folder.")
    return module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------- export
def merge(model, record, adapter_state, adapter_folder=None):
    """``model`` (a transformers model holding the base weights) with the run's adapters
    (``adapter_state``, named as in ``model``) merged into its weights. ``adapter_folder``: also
    write the adapters there as ``peft.PeftModel.from_pretrained`` loads them onto the base."""
    peft_model = get_peft_model(model, LoraConfig(**record["config"]))  # adapters go in in place
    missing, unexpected = model.load_state_dict(adapter_state, strict=False)
    adapters = {k for k, _ in model.named_parameters() if ".lora_" in k}
    if unexpected or adapters & set(missing):
        raise ValueError(f"the checkpoint's adapters do not fit the model: unexpected "
                         f"{unexpected[:3]}, missing {sorted(adapters & set(missing))[:3]}")
    if adapter_folder is not None:
        peft_model.save_pretrained(adapter_folder)
    return peft_model.merge_and_unload()
