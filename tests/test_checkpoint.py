"""Checkpoints: identical logits after a round trip, atomicity, incomplete directories."""

import json
import shutil

import pytest
import torch

from llmkit.core.config import OptimConfig
from llmkit.core.errors import CheckpointError
from llmkit.core.model.transformer import Transformer
from llmkit.core.store import checkpoint as ck
from llmkit.core.training.loop import lm_loss
from llmkit.core.training.optim import make_optimizer


def _save(tmp_path, tokenizer, cfg, name="ckpt", optimizer=True):
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = make_optimizer(model, OptimConfig())
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
    opt.step()
    config = {
        "model": {
            "vocab_size": cfg.vocab_size,
            "context": cfg.context,
            "d_model": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_kv_head": cfg.n_kv_head,
        }
    }
    path = ck.save_checkpoint(
        tmp_path / name,
        model=model,
        config=config,
        tokenizer=tokenizer,
        state={"step": 1},
        optimizer=opt if optimizer else None,
    )
    return path, model.eval(), opt


def test_save_then_load_gives_identical_logits(tmp_path, tokenizer, tiny_model_cfg):
    path, model, _ = _save(tmp_path, tokenizer, tiny_model_cfg)
    loaded, ckpt = ck.load_model(path)
    x = torch.randint(0, tiny_model_cfg.vocab_size, (3, 20))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert ckpt.tokenizer.contract == tokenizer.contract
    assert loaded.lm_head.weight is loaded.embed.weight


def test_optimizer_state_round_trips_without_pickle(tmp_path, tokenizer, tiny_model_cfg):
    path, model, opt = _save(tmp_path, tokenizer, tiny_model_cfg)
    fresh = make_optimizer(model, OptimConfig())
    ck.load_optimizer_state(fresh, path / "optimizer.safetensors")
    a, b = opt.state_dict(), fresh.state_dict()
    for idx, slots in a["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, b["state"][idx][name])
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]


def test_layout_and_trainer_state_written(tmp_path, tokenizer, tiny_model_cfg):
    path, _, _ = _save(tmp_path, tokenizer, tiny_model_cfg)
    assert sorted(p.name for p in path.iterdir()) == sorted([*ck.REQUIRED, "tokenizer.model", "optimizer.safetensors"])
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 1 and "torch" in state["versions"]
    assert not (tmp_path / "ckpt.tmp").exists()


def test_directory_without_trainer_state_is_never_loaded(tmp_path, tokenizer, tiny_model_cfg):
    path, _, _ = _save(tmp_path, tokenizer, tiny_model_cfg)
    half = tmp_path / "half"
    shutil.copytree(path, half)
    (half / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing trainer_state.json"):
        ck.resolve_checkpoint(half)
    (path / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.model"):
        ck.resolve_checkpoint(path)


def test_run_directory_resolves_to_best(tmp_path, tokenizer, tiny_model_cfg):
    _save(tmp_path / "run", tokenizer, tiny_model_cfg, name="best")
    assert ck.resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "best"
    with pytest.raises(CheckpointError, match="not a checkpoint or run directory"):
        ck.resolve_checkpoint(tmp_path)
