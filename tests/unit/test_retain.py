"""The forgetting guardrail: retain sets scored before training and at every validation, the
checkpoint selection by retain WER, and the language a retain set is decoded in."""

import csv
import json
import logging

import pytest
import speechbrain as sb
import torch
from fakes import REPO, SYNTHETIC, experiment, write_subset
from speechbrain.utils.checkpoints import Checkpointer

from speechtune.prepare.synthetic import prepare_synthetic
from speechtune.recipe import build_experiment, load_yaml
from speechtune.retain import RetainGuard, base_scores, select_checkpoint

WHISPER_YAML = REPO / "recipes" / "Synthetic" / "Whisper" / "hparams" / "whisper_tiny.yaml"


@pytest.fixture
def retain_manifest(tmp_path):
    """Six English utterances of the held-out set: voices and sentences of no other split."""
    write_subset(SYNTHETIC / "en_heldout", tmp_path / "retain", {"test": 6})
    return str(tmp_path / "retain" / "test.csv")


def hypotheses(metric):
    return {s["key"]: s["hyp_tokens"] for s in metric.scores}


def test_retain_scores_equal_a_separate_evaluation_of_the_checkpoint(
        synthetic_subset, tmp_path, retain_manifest):
    out = tmp_path / "run"
    exp = experiment(synthetic_subset, out, number_of_epochs=2,
                     retain={"en": {"manifest": retain_manifest, "language": "en"}})
    brain = exp.brain
    dataset_loader = brain.retain.loaders["retain_en"]
    before = brain.retain.score(brain)  # the micro model as built
    base_hyps = hypotheses(brain.wer_metric)
    exp.fit()
    assert json.loads((out / "retain_base.json").read_text()) == before == brain.retain.base
    brain.retain.loaders = {"retain_other": None}  # a rerun with other retain sets
    with pytest.raises(ValueError, match=r"holds the base model's WER on \['retain_en'\]"):
        base_scores(brain, brain.retain, out)
    brain.retain.loaders = {"retain_en": dataset_loader}
    history = brain.hparams.history
    assert [step for step, _ in history.retain] == [step for step, _, _ in history.valid]
    last = history.retain[-1][1]["retain_en"]
    trained_hyps = hypotheses(brain.wer_metric)  # the last validation's retain decoding
    assert trained_hyps != base_hyps  # training changed what it writes
    # the same checkpoint (the last is the only one kept with one epoch's best) tested apart
    dataset = brain.retain.loaders["retain_en"].dataset
    stats = brain.evaluate(dataset, split="retain_en",
                           test_loader_kwargs={"batch_size": 3, "num_workers": 0})
    assert stats["WER"] == pytest.approx(last)
    assert hypotheses(brain.wer_metric) == trained_hyps
    log = (out / "train_log.txt").read_text()
    assert log.count("valid WER_retain_en:") == 2
    ckpt = brain.checkpointer.find_checkpoint(min_key="WER")
    assert ckpt.meta["WER_retain_en"] == last
    assert ckpt.meta["retain_rise"] == pytest.approx(last - before["retain_en"])


def fake_checkpoints(folder, metas):
    checkpointer = Checkpointer(folder, {"weights": torch.nn.Linear(1, 1)})
    for meta in metas:
        checkpointer.save_checkpoint(meta=meta)
    return checkpointer


def test_the_selection_picks_the_best_wer_among_checkpoints_that_kept_the_retain_sets(
        tmp_path, caplog):
    metas = [{"WER": 10.0, "retain_rise": 12.0, "step": 1},  # best WER, forgot most
             {"WER": 12.0, "retain_rise": 3.0, "step": 2},   # the documented choice at 5
             {"WER": 15.0, "retain_rise": 1.0, "step": 3},
             {"WER": 11.0, "retain_rise": 6.0, "step": 4}]
    checkpointer = fake_checkpoints(tmp_path / "ckpt", metas)
    guard = RetainGuard({}, max_rise=5.0)
    assert select_checkpoint(checkpointer, guard).meta["step"] == 2
    guard.max_rise = 6.0
    assert select_checkpoint(checkpointer, guard).meta["step"] == 4
    guard.max_rise = 0.5
    with caplog.at_level(logging.WARNING):
        assert select_checkpoint(checkpointer, guard) is None
    assert "NO CHECKPOINT KEPT THE RETAIN SETS" in caplog.text
    assert "(the smallest rise: 1.0)" in caplog.text


def test_the_qualifying_checkpoint_is_kept_beside_the_best_wer_one(tmp_path):
    guard = RetainGuard({}, max_rise=5.0)
    checkpointer = Checkpointer(tmp_path / "ckpt", {"weights": torch.nn.Linear(1, 1)})
    for meta in [{"WER": 20.0, "retain_rise": 1.0, "step": 1},
                 {"WER": 12.0, "retain_rise": 3.0, "step": 2},
                 {"WER": 10.0, "retain_rise": 12.0, "step": 3},
                 {"WER": 11.0, "retain_rise": 9.0, "step": 4}]:
        checkpointer.save_and_keep_only(meta=meta, min_keys=["WER"], num_to_keep=1,
                                        importance_keys=[guard.importance], keep_recent=False)
    kept = sorted(c.meta["step"] for c in checkpointer.list_checkpoints())
    assert kept == [2, 3]  # the best that kept the retain sets, and the best WER


def test_a_run_that_forgot_tests_the_best_wer_checkpoint_and_says_so(
        synthetic_subset, tmp_path, retain_manifest, caplog):
    exp = experiment(synthetic_subset, tmp_path / "run", retain_max_rise=-1.0,
                     retain={"en": {"manifest": retain_manifest, "language": "en"}})
    exp.fit()
    with caplog.at_level(logging.WARNING):
        exp.evaluate()
    assert "NO CHECKPOINT KEPT THE RETAIN SETS" in caplog.text
    lines = exp.brain.retain.summary(exp.brain.checkpointer)
    assert "NONE rose by at most -1 points" in lines[0] and "retain_en: WER" in lines[1]


@pytest.mark.parametrize("overrides, message", [
    ({"retain_max_rise": 5.0}, "no retain set is given"),
    ({"retain": {"en": {"manifest": "x.csv"}}}, r"retain.en: give \{manifest"),
    ({"retain": {"en": {"manifest": "M", "language": "en"}}, "retain_max_rise": 5.0,
      "average_best": 2}, "average_best > 1"),
])
def test_retain_settings_that_cannot_work_are_refused(synthetic_subset, tmp_path,
                                                       retain_manifest, overrides, message):
    if "retain" in overrides and overrides["retain"]["en"].get("manifest") == "M":
        overrides["retain"]["en"]["manifest"] = retain_manifest
    with pytest.raises(ValueError, match=message):
        experiment(synthetic_subset, tmp_path / "run", **overrides)


def danish_whisper(tmp_path, model, **overrides):
    """An in-process Danish run of the Synthetic Whisper yaml on a micro multilingual Whisper."""
    data = tmp_path / "data"
    write_subset(SYNTHETIC / "da", data / "da", {"train": 12, "valid": 4, "test": 4})
    hparams = load_yaml(WHISPER_YAML, {
        "data_folder": str(data), "output_folder": str(tmp_path / "run"), "model": str(model),
        "tiny_config": None, "language": "da", "max_batch_seconds": 8, "number_of_epochs": 1,
        "min_duration": 0.0, **overrides})
    return build_experiment(hparams, {"device": "cpu"}, prepare_synthetic)


def test_whisper_decodes_a_retain_set_after_its_own_language_token(
        tmp_path, retain_manifest, micro_whisper_multi_dir):
    brain = danish_whisper(tmp_path, micro_whisper_multi_dir, retain={
        "en": {"manifest": retain_manifest, "language": "en"}}).brain
    seen = []
    for searcher in (brain.valid_search, brain.test_search):
        original = searcher.set_lang_tokens
        searcher.set_lang_tokens = lambda token, original=original: (
            seen.append(token), original(token))
    brain.retain.score(brain)
    english = brain.tokenizer.convert_tokens_to_ids("<|en|>")
    # the split's token at the stage start, then each utterance's own (its prefix's) per batch
    tokens = [t for token in seen for t in (token.tolist() if torch.is_tensor(token) else [token])]
    assert seen and set(tokens) == {english}
    assert brain.score_normalize is brain.score_normalizers["en"]
    seen.clear()
    brain.on_stage_start(sb.Stage.VALID)  # the valid split: the run's language (no override)
    assert set(seen) == {None} and brain.score_normalize is brain.score_normalizers["da"]


def test_replay_trains_on_retain_language_speech_with_its_own_prefix_and_normaliser(
        tmp_path, retain_manifest, micro_whisper_multi_dir):
    write_subset(SYNTHETIC / "en", tmp_path / "replay", {"train": 30})
    manifest = tmp_path / "replay" / "train.csv"
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()  # "don't": the English normaliser keeps it, the Danish one not
        writer.writerows([{**row, "wrd": "don't " + row["wrd"]} for row in rows])
    spec = {"en": {"manifest": retain_manifest, "language": "en", "replay": str(manifest)}}
    exp = danish_whisper(tmp_path, micro_whisper_multi_dir, retain=spec, replay_fraction=0.2)
    replay = [i for i in exp.train.data_ids if i.startswith("en_train_")]
    assert len(replay) == 3 and len(exp.train.data_ids) == 15  # 0.2 of 15: 12 Danish + 3
    again = danish_whisper(tmp_path / "again", micro_whisper_multi_dir, retain=spec,
                           replay_fraction=0.2)
    assert sorted(i for i in again.train.data_ids if i.startswith("en_")) == sorted(replay)
    tokenizer = exp.brain.tokenizer
    english, danish = (tokenizer.convert_tokens_to_ids(f"<|{x}|>") for x in ("en", "da"))
    position = {i: n for n, i in enumerate(exp.train.data_ids)}
    danish_id = next(i for i in exp.train.data_ids if not i.startswith("en_"))
    # <|startoftranscript|><|xx|>...: each utterance after its own language's token
    assert exp.train[position[replay[0]]]["tokens_bos"][1] == english
    assert exp.train[position[danish_id]]["tokens_bos"][1] == danish
    assert all(exp.train.data[i]["target"].startswith("don't ") for i in replay)
    assert all(exp.train.data[i]["utt_language"] == "en" for i in replay)
    # a computed key, not a group column of the per-group tables
    columns = {c for split in exp.brain.groups.values() for row in split.values() for c in row}
    assert columns == {"voice", "gender"}


@pytest.mark.parametrize("overrides, message", [
    ({"replay_fraction": 0.2}, "no retain set names a replay manifest"),
    ({"replay_fraction": 1.0}, "at least 0 and below 1"),
])
def test_replay_settings_that_cannot_work_are_refused(synthetic_subset, tmp_path,
                                                      retain_manifest, overrides, message):
    with pytest.raises(ValueError, match=message):
        experiment(synthetic_subset, tmp_path / "run", **overrides, retain={
            "en": {"manifest": retain_manifest, "language": "en"}})


def test_a_replay_id_that_is_also_a_training_id_is_refused(synthetic_subset, tmp_path,
                                                           retain_manifest):
    replay = synthetic_subset / "en" / "train.csv"  # the training manifest itself
    with pytest.raises(ValueError, match=r"replay utterance ID\(s\) .* are also training IDs"):
        experiment(synthetic_subset, tmp_path / "run", replay_fraction=0.5, retain={
            "en": {"manifest": retain_manifest, "language": "en", "replay": str(replay)}})
