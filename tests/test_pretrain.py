"""Pretraining end to end through core: exact resume, early stopping, divergence, outputs."""

import json
import math

import pytest
import torch
from conftest import TINY_SETS
from safetensors.torch import load_file

from llmkit.core.config import resolve_run_config
from llmkit.core.errors import ConfigError, TrainingDiverged
from llmkit.core.jobs.pretrain import plan, pretrain


def _run(out, corpus, sets=(), resume=None, on_event=lambda event: None, steps=4):
    cfg, resume_from = plan(
        out, resume=resume, preset=None, config_file=None, sets=[*TINY_SETS, f"train.steps={steps}", *sets], flags={}
    )
    return pretrain([str(corpus)], out, cfg, resume_from=resume_from, on_event=on_event)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


SPEEDRUN = ["optim.optimizer=muon", "optim.schedule=wsd", "model.mlp=relu2", "model.zero_init=true"]


@pytest.mark.parametrize("levers", [[], SPEEDRUN], ids=["adamw", "muon"])
def test_resume_is_exact(tmp_path, corpus_file, levers):
    sets = ["model.dropout=0.1", *levers]
    straight = _run(tmp_path / "a", corpus_file, sets=sets)
    assert straight.stop_reason == "steps"

    def interrupt_at_two(event):
        if event.kind == "step" and event.step == 2:
            raise KeyboardInterrupt

    first = _run(tmp_path / "b", corpus_file, sets=sets, on_event=interrupt_at_two)
    assert first.stop_reason == "interrupted" and first.state.step == 2
    resumed = _run(tmp_path / "b", corpus_file, sets=sets, resume="auto")
    assert resumed.state.step == 4
    a, b = _weights(tmp_path / "a" / "last"), _weights(tmp_path / "b" / "last")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_directory_contents(tmp_path, corpus_file):
    result = _run(tmp_path / "r", corpus_file)
    out = tmp_path / "r"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "loss.svg",
        "tokenizer/tokenizer.model",
        "best/model.safetensors",
        "last/trainer_state.json",
        "step-000004/optimizer.safetensors",
    ):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["event"] == "eval"]
    assert evals and all(math.isfinite(r["val_bpb"]) and r["val_ppl"] > 1 for r in evals)
    assert result.samples and isinstance(result.samples[0][1], str)
    assert "<svg" in (out / "loss.svg").read_text()


def test_existing_run_needs_resume(tmp_path, corpus_file):
    _run(tmp_path / "r", corpus_file)
    with pytest.raises(ConfigError, match="already holds a run.*--resume auto"):
        _run(tmp_path / "r", corpus_file)


def test_early_stopping_with_patience(tmp_path, corpus_file):
    # A learning rate of ~0 cannot improve after the first evaluation: patience 1 stops it.
    result = _run(
        tmp_path / "r",
        corpus_file,
        steps=50,
        sets=["optim.lr=1e-12", "optim.warmup_steps=0", "train.patience=1", "train.min_delta=0.01"],
    )
    assert result.stop_reason == "early_stop" and result.state.step < 50


def test_divergence_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, corpus_file):
    events = []

    def poison(event):
        events.append(event.kind)
        if event.kind == "save" and event.what == "step" and event.step == 2:
            # Corrupt the weights after the step-2 checkpoint: the next loss is NaN.
            import gc

            for obj in gc.get_objects():
                if type(obj) is torch.nn.Embedding:
                    obj.weight.data.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="diverged at step 2.*last good checkpoint"):
        _run(tmp_path / "r", corpus_file, on_event=poison)
    state = json.loads((tmp_path / "r" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "r" / "last").values())


def test_print_config_reflects_layers():
    cfg = resolve_run_config(preset="small", sets=["train.steps=7"])
    assert "steps: 7" in cfg.to_yaml() and "d_model: 384" in cfg.to_yaml()


def test_resume_refuses_a_config_that_changes_the_model(tmp_path, corpus_file):
    from llmkit.core.errors import CheckpointError

    _run(tmp_path / "r", corpus_file, steps=2)
    with pytest.raises(CheckpointError, match=r"changes the model: model.d_model 64 \(checkpoint: 32\)"):
        _run(tmp_path / "r", corpus_file, steps=4, sets=["model.d_model=64"], resume="auto")
