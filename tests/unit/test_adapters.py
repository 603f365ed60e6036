"""LoRA adapters and gradient checkpointing (``speechtune.adapters``) on both families, driven in
process through the real Synthetic yamls with micro models: what trains, what a checkpoint holds,
resume, merged export, the refused set-ups."""

import json
import re

import numpy as np
import pytest
import speechbrain as sb
import torch
from fakes import MICRO_ENCODER, MICRO_WHISPER, REPO, experiment
from peft import PeftModel
from transformers import AutoModelForCTC, WhisperForConditionalGeneration

from speechtune import adapters
from speechtune.export import export
from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import build_experiment, load_yaml

WHISPER_YAML = REPO / "recipes" / "Synthetic" / "Whisper" / "hparams" / "whisper_tiny.yaml"


def whisper_experiment(data_dir, out, **overrides):
    """The Synthetic Whisper yaml on the micro Whisper (encoder frozen, decoder LoRA unless
    ``overrides`` say otherwise), one epoch."""
    out.mkdir(parents=True, exist_ok=True)
    base = {"data_folder": str(data_dir), "output_folder": str(out),
            "tiny_config": MICRO_WHISPER, "max_batch_seconds": 8, "number_of_epochs": 1,
            "min_duration": 0.0, "freeze_encoder": True, "lora": "decoder", "lr": 0.01,
            "warmup_steps": 2}
    base.update(overrides)
    return build_experiment(load_yaml(WHISPER_YAML, base), {"device": "cpu"}, prepare_synthetic)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def test_whisper_decoder_lora_trains_the_adapters_and_nothing_else(synthetic_subset, tmp_path):
    exp = whisper_experiment(synthetic_subset, tmp_path / "run")
    whisper = exp.brain.modules.whisper
    before = snapshot(whisper)
    trainable = adapters.trainable_names(whisper)
    assert trainable and all(".lora_" in n and ".decoder." in n for n in trainable)
    assert any("encoder_attn.q_proj" in n for n in trainable)  # cross-attention too
    exp.fit()
    moved = changed(before, whisper)
    assert moved and moved <= trainable
    assert any(".lora_B." in n for n in moved)  # B starts at zero: the adapters now act
    opt_params = sum(len(g["params"]) for g in exp.brain.optimizers_dict["whisper"].param_groups)
    assert opt_params == len(trainable)


def test_ctc_encoder_lora_trains_the_adapters_and_the_whole_head(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", lora="encoder", lora_targets="all-linear",
                     freeze_encoder_steps=0, lr_encoder=0.01)
    encoder, head = exp.brain.modules.encoder, exp.brain.modules.head
    before, head_before = snapshot(encoder), snapshot(head)
    trainable = adapters.trainable_names(encoder)
    assert trainable and all(".lora_" in n and ".encoder.layers." in n for n in trainable)
    # all-linear: the attention's and the feed-forward's linear layers
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {
        "q_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"}
    exp.fit()
    assert changed(before, encoder) <= trainable and changed(before, encoder)
    assert changed(head_before, head) == set(head_before)


def test_lora_checkpoint_holds_the_adapters_and_a_rerun_resumes_them(synthetic_subset, tmp_path):
    out = tmp_path / "run"
    exp = whisper_experiment(synthetic_subset, out)
    exp.fit()
    whisper = exp.brain.modules.whisper
    ckpt = exp.brain.checkpointer.find_checkpoint(min_key="WER")
    saved = torch.load(ckpt.paramfiles["whisper"])
    assert set(saved) == adapters.trainable_names(whisper)
    full = sum(t.numel() * t.element_size() for t in whisper.state_dict().values())
    assert ckpt.paramfiles["whisper"].stat().st_size < full / 10

    # a rerun of the command (a new process: the weights as loaded) resumes the adapters
    again = whisper_experiment(synthetic_subset, out, number_of_epochs=2)
    fresh = snapshot(again.brain.modules.whisper)
    assert all(torch.count_nonzero(fresh[n]) == 0 for n in saved if ".lora_B." in n)
    again.brain.checkpointer.recover_if_possible(min_key="WER")
    resumed = dict(again.brain.modules.whisper.named_parameters())
    for name, value in saved.items():
        assert torch.equal(resumed[name], value)
    for name in set(fresh) - set(saved):  # the frozen weights are the source's, as before
        assert torch.equal(resumed[name], fresh[name])


def test_average_best_averages_the_adapters(synthetic_subset, tmp_path):
    exp = whisper_experiment(synthetic_subset, tmp_path / "run", number_of_epochs=3,
                             num_to_keep=3, average_best=2)
    exp.fit()
    best2 = exp.brain.checkpointer.find_checkpoints(min_key="WER", max_num_checkpoints=2)
    exp.brain.on_evaluate_start(min_key="WER")
    assert exp.brain.averaged_from == [c.path.name for c in best2]
    states = [torch.load(c.paramfiles["whisper"]) for c in best2]
    now = dict(exp.brain.modules.whisper.named_parameters())
    for key in states[0]:
        torch.testing.assert_close(now[key], (states[0][key] + states[1][key]) / 2)
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resumed_lora_run_ends_where_the_uninterrupted_one_does(synthetic_subset, tmp_path):
    straight = whisper_experiment(synthetic_subset, tmp_path / "straight", number_of_epochs=2)
    straight.fit()
    first = whisper_experiment(synthetic_subset, tmp_path / "split", number_of_epochs=1)
    first.fit()
    second = whisper_experiment(synthetic_subset, tmp_path / "split", number_of_epochs=2)
    second.fit()
    assert second.brain.optimizer_step == straight.brain.optimizer_step
    a = dict(straight.brain.modules.whisper.named_parameters())
    b = dict(second.brain.modules.whisper.named_parameters())
    for name in adapters.trainable_names(straight.brain.modules.whisper):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_whisper_lora_export_merges_into_the_weights_and_writes_the_adapter(synthetic_subset,
                                                                            tmp_path):
    out = tmp_path / "run"
    exp = whisper_experiment(synthetic_subset, out, number_of_epochs=2)
    exp.fit()
    exported = tmp_path / "export"
    export(out, exported)
    assert (exported / "adapter" / "adapter_config.json").is_file()

    brain = exp.brain
    brain.checkpointer.recover_if_possible(min_key="WER")
    whisper = brain.modules.whisper.eval()
    wav = torch.randn(1, 16000)
    tokens = torch.tensor([brain.tokenizer.prefix_tokens + [300, 301, 302]])
    with torch.no_grad():
        _, ours, _ = whisper(wav, tokens)
        mel = whisper._get_mel(wav)
        merged = WhisperForConditionalGeneration.from_pretrained(exported).eval()
        theirs = merged(input_features=mel, decoder_input_ids=tokens).logits
        base = WhisperForConditionalGeneration.from_pretrained(out / "tiny_model").eval()
        plain = base(input_features=mel, decoder_input_ids=tokens).logits
        peft = PeftModel.from_pretrained(base, exported / "adapter").eval()
        loaded = peft(input_features=mel, decoder_input_ids=tokens).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())


def test_ctc_lora_export_merges_into_the_encoder(synthetic_subset, tmp_path):
    out = tmp_path / "run"
    exp = experiment(synthetic_subset, out, lora="encoder", freeze_encoder_steps=0,
                     lr_encoder=0.01)
    exp.fit()
    exported = tmp_path / "export"
    export(out, exported)
    brain = exp.brain
    brain.checkpointer.recover_if_possible(min_key="WER")
    brain.modules.eval()
    wav = torch.randn(1, 16000)
    with torch.no_grad():
        ours = brain.modules.head(brain.modules.encoder(wav, torch.ones(1)))
        model = AutoModelForCTC.from_pretrained(exported).eval()
        normalized = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)
        theirs = model(normalized).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    record = json.loads((out / "run.json").read_text())["lora"]
    assert record["where"] == "encoder" and record["trainable_parameters"] > 0


@pytest.mark.parametrize("overrides, message", [
    ({"lora": "sideways"}, "use null (off) or one of decoder, encoder, both"),
    ({"lora_targets": ["q_proj", "nope"]}, "not ['nope']"),
    ({"lora_targets": "q_proj"}, "Give a list of them, or all-linear"),
    ({"lora_rank": 0}, "both must be positive"),
    ({"lora": "both"}, "--freeze_encoder=False --encoder_cache=null"),
    ({"lora": "decoder", "freeze_encoder": False}, "--freeze_encoder=True, or --lora=both"),
])
def test_lora_set_ups_that_cannot_work_are_refused(synthetic_subset, tmp_path, overrides,
                                                    message):
    with pytest.raises(ValueError, match=re.escape(message)):
        whisper_experiment(synthetic_subset, tmp_path / "run", **overrides)


def test_resuming_with_other_lora_settings_is_refused(synthetic_subset, tmp_path):
    whisper_experiment(synthetic_subset, tmp_path / "run").fit()
    other = whisper_experiment(synthetic_subset, tmp_path / "run", lora_rank=16,
                               number_of_epochs=2)
    with pytest.raises(ValueError, match="do not fit this run's LoRA set-up"):
        other.brain.checkpointer.recover_if_possible(min_key="WER")


def test_ctc_has_lora_in_its_encoder_only(synthetic_subset, tmp_path):
    with pytest.raises(ValueError, match="use null \\(off\\) or one of encoder"):
        experiment(synthetic_subset, tmp_path / "run", lora="decoder")


def gradients(exp):
    """The trainable parameters' gradients of one training batch (seeded: dropout, masks)."""
    brain = exp.brain
    brain.on_fit_start()
    batch = next(iter(brain.make_dataloader(exp.train, stage=sb.Stage.TRAIN, ckpt_prefix=None,
                                            **exp.loader_kwargs["train"])))
    brain.modules.train()
    torch.manual_seed(0)
    np.random.seed(0)
    stage = sb.Stage.TRAIN
    loss = brain.compute_objectives(brain.compute_forward(batch, stage), batch, stage)
    loss.backward()
    return {n: p.grad.clone() for m in brain._own_modules.values()
            for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["ctc", "whisper"])
def test_gradient_checkpointing_gives_the_same_gradients(synthetic_subset, tmp_path, family):
    def build(on):
        if family == "ctc":
            exp = experiment(synthetic_subset, tmp_path / f"run{on}", freeze_encoder_steps=0,
                             gradient_checkpointing=on, tiny_config=MICRO_ENCODER)
            return exp, exp.brain.modules.encoder.model
        exp = whisper_experiment(synthetic_subset, tmp_path / f"run{on}", lora=None,
                                 freeze_encoder=False, gradient_checkpointing=on)
        return exp, exp.brain.modules.whisper.model

    (plain, plain_model), (checkpointed, model) = build(False), build(True)
    assert model.is_gradient_checkpointing and not plain_model.is_gradient_checkpointing
    a, b = gradients(plain), gradients(checkpointed)
    assert a.keys() == b.keys() and len(a) > 4
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
