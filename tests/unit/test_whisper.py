"""WhisperBrain behaviour, driven in-process through the real Synthetic Whisper yaml with a micro
Whisper: Noam LR per optimizer step, frozen encoder, decoder inputs/targets, text scoring."""

import csv

import pytest
import speechbrain as sb
import torch
from fakes import MICRO_WHISPER, REPO, SYNTHETIC, write_subset
from speechbrain.decoders.seq2seq import S2SWhisperBeamSearcher
from transformers.cache_utils import DynamicCache

from speechtune.data import load_audio
from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import build_experiment, load_yaml
from speechtune.whisper import WhisperFamily, scoring_normalizer
from speechtune.whisper_models import Whisper, WhisperBeamSearcher

YAML = REPO / "recipes" / "Synthetic" / "Whisper" / "hparams" / "whisper_tiny.yaml"


def load(data_dir, out, **overrides):
    out.mkdir(parents=True, exist_ok=True)
    base = {"data_folder": str(data_dir), "output_folder": str(out),
            "tiny_config": MICRO_WHISPER, "max_batch_seconds": 8, "number_of_epochs": 1,
            "min_duration": 0.0}
    base.update(overrides)
    return load_yaml(YAML, base)


def built(hparams):
    """The Whisper family with its model built (the checks that need the model run then)."""
    family = WhisperFamily(hparams)
    family.build_model(["a text", "another one"])
    return family


def experiment(data_dir, out, **overrides):
    hparams = load(data_dir, out, **overrides)
    return build_experiment(hparams, {"device": "cpu"}, prepare_synthetic)


def noam(peak, warmup, step):
    return peak * warmup**0.5 * min(step**-0.5, step * warmup**-1.5)


def encoder_params(brain):
    return dict(brain.modules.whisper.model.encoder.named_parameters())


def test_noam_lr_changes_at_every_optimizer_step(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", warmup_steps=3, lr=0.01,
                     grad_accumulation_factor=2)
    brain, seen = exp.brain, []
    orig = brain.on_fit_batch_start

    def record(batch, should_step):  # the LR the coming optimizer step will use
        if should_step:
            seen.append((brain.optimizer_step + 1, brain.current_lrs()["lr_whisper"]))
        return orig(batch, should_step)

    brain.on_fit_batch_start = record
    exp.fit()
    assert len(seen) >= 4, "need a few optimizer steps"
    for step, lr in seen:
        assert lr == pytest.approx(noam(0.01, 3, step))
    lrs = [lr for _, lr in seen]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[3] < lrs[2]  # warm-up, then decay
    assert brain.optimizer_step == len(seen)


def test_frozen_encoder_never_changes_and_gets_no_gradients(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", freeze_encoder=True)
    brain = exp.brain
    start = {n: p.detach().clone() for n, p in encoder_params(brain).items()}
    decoder0 = brain.modules.whisper.model.decoder.layers[0].fc1.weight.detach().clone()
    enc_grad, orig = [], brain.modules.whisper.forward_encoder

    def spy(mel):  # the encoder's output carries no autograd graph (no activation memory)
        out = orig(mel)
        enc_grad.append(out.requires_grad or torch.is_grad_enabled())
        return out

    brain.modules.whisper.forward_encoder = spy
    exp.fit()
    assert brain.optimizer_step > 0 and enc_grad and not any(enc_grad)
    for n, p in encoder_params(brain).items():
        assert torch.equal(p, start[n]) and p.grad is None and not p.requires_grad, n
    assert not torch.equal(brain.modules.whisper.model.decoder.layers[0].fc1.weight, decoder0)


def test_staged_unfreezing_trains_the_encoder_after_n_steps(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run", freeze_encoder=False,
                     freeze_encoder_steps=2)
    brain = exp.brain
    start = {n: p.detach().clone() for n, p in encoder_params(brain).items()}
    states, orig = [], brain.on_fit_batch_end

    def record(batch, outputs, loss, should_step):
        orig(batch, outputs, loss, should_step)
        params = encoder_params(brain)
        states.append((brain.optimizer_step,
                       all(torch.equal(p, start[n]) for n, p in params.items()),
                       all(p.grad is None for p in params.values())))

    brain.on_fit_batch_end = record
    exp.fit()
    assert len(states) >= 4
    for step, unchanged, no_grad in states:
        if step <= 2:
            assert unchanged and no_grad, f"encoder changed while frozen at step {step}"
    assert not states[-1][1], "encoder never trained after freeze_encoder_steps"


def test_decoder_inputs_targets_and_padding(synthetic_subset, tmp_path):
    exp = experiment(synthetic_subset, tmp_path / "run")
    brain, tok = exp.brain, exp.brain.tokenizer
    batch = next(iter(brain.make_dataloader(exp.train, sb.Stage.TRAIN, batch_size=4)))
    bos, bos_lens = batch.tokens_bos
    eos, eos_lens = batch.tokens_eos
    prefix = tok.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    assert bos.shape == eos.shape
    for i, words in enumerate(batch.words):
        n = int(round(float(bos_lens[i]) * bos.shape[1]))
        assert bos[i, :4].tolist() == prefix
        assert eos[i, : n - 1].tolist() == bos[i, 1:n].tolist()  # targets = inputs shifted by one
        assert eos[i, n - 1] == tok.eos_token_id
        assert tok.decode(bos[i, 4:n]) == words
    decoder = brain.modules.whisper.model.decoder
    seen, orig = [], decoder.forward

    def spy(*args, input_ids, **kw):
        seen.append(input_ids.clone())
        return orig(*args, input_ids=input_ids, **kw)

    decoder.forward = spy
    brain.compute_forward(batch, sb.Stage.TRAIN)
    lens = (bos_lens * bos.shape[1]).round().long()
    for i, n in enumerate(lens):
        assert (seen[0][i, n:] == tok.pad_token_id).all()  # not 0, a real BPE token


def test_english_only_model_has_no_language_or_task_token(synthetic_subset, tmp_path):
    micro_en = {**MICRO_WHISPER, "multilingual": False}
    exp = experiment(synthetic_subset, tmp_path / "run", tiny_config=micro_en)
    batch = next(iter(exp.brain.make_dataloader(exp.train, sb.Stage.TRAIN, batch_size=2)))
    tok = exp.brain.tokenizer
    assert tok.convert_ids_to_tokens(batch.tokens_bos[0][0, :2].tolist()) == [
        "<|startoftranscript|>", "<|notimestamps|>"]


def test_danish_letters_survive_tokenisation_normalisation_and_scoring(tmp_path):
    from speechbrain.utils.metric_stats import ErrorRateStats

    data = tmp_path / "data"
    write_subset(SYNTHETIC / "da", data / "da", {"train": 24, "valid": 4, "test": 4})
    exp = experiment(data, tmp_path / "run", language="da")
    tok, norm = exp.brain.tokenizer, exp.brain.score_normalize
    assert tok.convert_ids_to_tokens(tok.prefix_tokens)[1] == "<|da|>"
    text = norm("Blåbær på Ærø, sagde Søren!")
    assert text == "blåbær på ærø sagde søren"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    wer = ErrorRateStats()
    wer.append(["u1", "u2"], [text.split(), norm("blabaer pa aero sagde soren").split()],
               [text.split(), text.split()])
    assert wer.summarize("error_rate") == pytest.approx(40.0)  # 4 of 10 words wrong, none lost
    words = [exp.valid.data[i]["words"] for i in exp.valid.data_ids]
    assert any(c in "".join(words) for c in "æøå")


def test_english_scoring_uses_whispers_normaliser():
    norm = scoring_normalizer("en", tokenizer=None)
    assert norm("Hello, Mr. Smith! It's 10 o'clock.") == norm("hello mister smith it is 10 o'clock")
    assert scoring_normalizer("da", tokenizer=None)("Ærø!") == "ærø"


def test_misconfigurations_are_refused(synthetic_subset, tmp_path):
    write_subset(SYNTHETIC / "da", synthetic_subset / "da", {"train": 8, "valid": 2, "test": 2})
    micro_en = {**MICRO_WHISPER, "multilingual": False}
    with pytest.raises(ValueError, match="English-only Whisper"):
        built(load(synthetic_subset, tmp_path / "a", tiny_config=micro_en, language="da"))
    with pytest.raises(ValueError, match="no effect with freeze_encoder: True"):
        WhisperFamily(load(synthetic_subset, tmp_path / "b", freeze_encoder=True,
                           freeze_encoder_steps=5))
    # 100 tokens after the prefix > 64 positions
    hp = load(synthetic_subset, tmp_path / "c", test_search={"max_decode_ratio": 0.5})
    with pytest.raises(ValueError, match="test_search: max_decode_ratio=0.5"):
        built(hp)


@pytest.mark.parametrize("where", ["memory", "folder"])
def test_encoder_cache_gives_the_loss_of_recomputing_and_skips_the_encoder(
        synthetic_subset, tmp_path, where):
    def losses(brain, batches):
        with torch.no_grad():
            return [brain.compute_objectives(brain.compute_forward(b, sb.Stage.TRAIN), b,
                                             sb.Stage.TRAIN) for b in batches]

    plain = experiment(synthetic_subset, tmp_path / "plain", freeze_encoder=True)
    batches = list(plain.brain.make_dataloader(plain.train, sb.Stage.TRAIN, batch_size=4))[:3]
    plain.brain.modules.eval()  # no dropout: both runs compute the same thing
    reference = losses(plain.brain, batches)

    cache_at = "memory" if where == "memory" else str(tmp_path / "cache")
    exp = experiment(synthetic_subset, tmp_path / "cached", freeze_encoder=True,
                     encoder_cache=cache_at)
    brain = exp.brain
    brain.modules.whisper.model.load_state_dict(plain.brain.modules.whisper.model.state_dict())
    brain.modules.eval()
    calls, orig = [], brain.modules.whisper.forward_encoder
    brain.modules.whisper.forward_encoder = lambda mel: calls.append(1) or orig(mel)
    first = losses(brain, batches)  # fills the cache
    assert len(calls) == 3
    second = losses(brain, batches)  # reads it
    assert len(calls) == 3, "the encoder ran although its outputs were cached"
    for ref, a, b in zip(reference, first, second, strict=True):
        assert torch.equal(ref, a) and torch.equal(ref, b)
    if where == "folder":
        assert len(list((tmp_path / "cache" / "float32").glob("*.pt"))) == sum(
            len(b.id) for b in batches)
        with pytest.raises(ValueError, match="holds outputs of"):
            experiment(synthetic_subset, tmp_path / "other", freeze_encoder=True,
                       encoder_cache=cache_at, tiny_config=dict(MICRO_WHISPER, d_model=48))


@pytest.mark.parametrize("overrides", [
    {"freeze_encoder": False},
    {"freeze_encoder": True, "augmenter": "!ref <augmentation[augmenter]>"},
])
def test_encoder_cache_refused_when_encoder_outputs_change(synthetic_subset, tmp_path, overrides):
    with pytest.raises(ValueError, match="encoder_cache=memory needs the same encoder output"):
        built(load(synthetic_subset, tmp_path / "run", encoder_cache="memory", **overrides))


def test_the_beam_searcher_writes_what_speechbrains_writes_without_the_cross_cache_copies(
        monkeypatch, tmp_path):
    """speechtune's WhisperBeamSearcher leaves the cross-attention cache in place (the beams of an
    utterance share it); on a batch of real whisper-base decodes its hypotheses are
    SpeechBrain's to the token."""
    whisper = Whisper("packaged:whisper-base", str(tmp_path), language="en", task="transcribe",
                      freeze=True, window_seconds=8).eval()
    settings = {"min_decode_ratio": 0.0, "max_decode_ratio": 0.25, "beam_size": 3,
                "length_normalization": True, "using_eos_threshold": True,
                "eos_threshold": 1.5}
    with open(SYNTHETIC / "en" / "test.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:3]
    sigs = [load_audio(r["wav"].replace("$data_root", str(SYNTHETIC)), 16000) for r in rows]
    wavs = torch.zeros(len(sigs), max(s.shape[0] for s in sigs))
    for i, sig in enumerate(sigs):
        wavs[i, :sig.shape[0]] = sig
    lens = torch.tensor([s.shape[0] / wavs.shape[1] for s in sigs])
    copied = []
    reorder = DynamicCache.reorder_cache
    monkeypatch.setattr(DynamicCache, "reorder_cache",
                        lambda cache, idx: (copied.append(id(cache)), reorder(cache, idx))[1])
    with torch.inference_mode():
        enc = whisper.forward_encoder(whisper._get_mel(wavs))
        ours = WhisperBeamSearcher(module=[whisper], **settings)(enc, lens)[0]
        caches_ours = set(copied)
        copied.clear()
        theirs = S2SWhisperBeamSearcher(module=[whisper], **settings)(enc, lens)[0]
    assert ours == theirs and all(len(h) > 3 for h in ours)
    assert len(caches_ours) == 1 and len(set(copied)) == 2  # self-attention only vs both


def test_the_training_decoder_pass_equals_speechbrains(synthetic_subset, tmp_path):
    """Training gives the decoder its causal mask (no host read in transformers' mask code);
    the logits are SpeechBrain's ``forward_decoder``'s."""
    whisper = experiment(synthetic_subset, tmp_path / "run").brain.modules.whisper.eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, whisper.model.config.vocab_size, (3, 9))
    with torch.no_grad():
        encoded, logits, _ = whisper(torch.randn(3, 16000), tokens)
        expected, _, _ = whisper.forward_decoder(encoded, tokens, use_cache=False)
    assert torch.allclose(logits, expected, atol=1e-5)
