"""The optimizers and the schedule: Muon's orthogonalised step, its groups, the wsd warm-down,
and the speedrun's model options (squared-ReLU MLP, zero-initialised projections)."""

import math
import re

import pytest
import torch

from llmkit.core.config import ModelConfig, OptimConfig
from llmkit.core.errors import ConfigError
from llmkit.core.model.transformer import Transformer
from llmkit.core.training.loop import next_token_loss
from llmkit.core.training.optim import MuonAdamW, lr_at, make_optimizer, orthogonalize

CFG = ModelConfig(vocab_size=64, context=16, d_model=32, n_layer=2, n_head=4)


# Rectangular: a square random matrix has singular values near 0, which five steps cannot lift.
@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (96, 32)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 100  # one dominant direction, as a gradient has: plain momentum would follow it alone
    o = orthogonalize(g)
    assert o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3, s  # Keller's iteration: near 1, not exactly 1
    # the same singular directions as g: o = U f(S) V^T, so U^T o V is diagonal
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    inner = u.T @ o @ vh.T
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=0.05)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = Transformer(ModelConfig(**{**CFG.__dict__, "tie_embeddings": False}))
    opt = make_optimizer(model, OptimConfig(optimizer="muon"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {True: set(), False: set()}
    for group in opt.param_groups:
        by_kind[group["muon"]] |= {names[id(p)] for p in group["params"]}
    assert by_kind[True] and all(n.startswith("blocks.") and n.endswith("_proj.weight") for n in by_kind[True])
    assert {"embed.weight", "lm_head.weight", "norm.weight"} <= by_kind[False]
    assert by_kind[True].isdisjoint(by_kind[False])
    assert len(by_kind[True]) + len(by_kind[False]) == len(list(model.parameters()))


def test_a_muon_step_moves_a_matrix_by_its_orthogonalised_momentum():
    w = torch.nn.Parameter(torch.zeros(8, 4))
    opt = MuonAdamW([{"params": [w], "weight_decay": 0.0, "muon": True}], lr=0.1, betas=(0.9, 0.95), eps=1e-8,
                    momentum=0.5)  # fmt: skip
    g = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    w.grad = g.clone()
    opt.step()
    # momentum buffer b = g; Nesterov update = g + 0.5 b = 1.5 g, orthogonalised (scale-free)
    expected = -0.1 * 0.2 * math.sqrt(8) * orthogonalize(1.5 * g)
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert torch.equal(opt.state[w]["momentum_buffer"], g)


def test_muon_and_adamw_both_learn_a_small_model():
    torch.manual_seed(0)
    x = torch.randint(0, 64, (8, 16))
    x[:, 1::2] = x[:, ::2]  # every odd token repeats the one before: learnable
    losses = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = Transformer(CFG)
        opt = make_optimizer(model, OptimConfig(optimizer=name, lr=3e-3, weight_decay=0.0))
        first = next_token_loss(model, x[:, :-1], x[:, 1:]).item()
        for _ in range(40):
            loss = next_token_loss(model, x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses[name] = (first, loss.item())
    for name, (first, last) in losses.items():
        assert last < 0.8 * first, (name, first, last)


def test_wsd_holds_the_rate_then_decays_linearly_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", cooldown=0.4)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)  # warmup as before
    assert lr_at(cfg, 50, 0.3) == lr_at(cfg, 50, 0.6) == 1.0
    assert lr_at(cfg, 50, 0.8) == pytest.approx(0.55)  # halfway down the last 40%
    assert lr_at(cfg, 50, 1.0) == pytest.approx(0.1)
    cosine = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cosine, 50, 0.5) == pytest.approx(0.55)  # the default is unchanged


def test_relu2_mlp_has_swiglus_parameters_and_zero_init_starts_each_block_as_the_identity():
    wide = {**CFG.__dict__, "d_model": 96}  # 8/3 x 96 = 256 needs no rounding to 64
    swiglu, relu2 = Transformer(ModelConfig(**wide)), Transformer(ModelConfig(**{**wide, "mlp": "relu2"}))
    block = lambda m: sum(p.numel() for p in m.blocks[0].mlp.parameters())  # noqa: E731
    assert block(relu2) == block(swiglu) == 3 * 96 * 256
    assert relu2.blocks[0].mlp.gate_proj is None
    zero = Transformer(ModelConfig(**{**CFG.__dict__, "zero_init": True}))
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        identity = zero.lm_head(zero.norm(zero.embed(x)))  # (B, T, V): what the logits are with no block
        assert torch.allclose(zero(x), identity, atol=1e-6)
        assert not torch.allclose(Transformer(CFG)(x), identity, atol=1e-3)


@pytest.mark.parametrize(
    "field, value, words",
    [("optimizer", "sgd", "adamw or muon"), ("schedule", "linear", "cosine or wsd"), ("cooldown", 0.0, "(0, 1]")],
)
def test_a_bad_optimizer_setting_is_named(field, value, words):
    with pytest.raises(ConfigError, match=rf"optim\.{field}.*{re.escape(words)}"):
        OptimConfig(**{field: value})


def test_muon_with_sharded_weights_is_refused_before_any_process_starts():
    from llmkit.core.config import resolve_run_config

    with pytest.raises(ConfigError, match="muon needs each weight matrix whole.*--strategy ddp"):
        resolve_run_config(sets=["optim.optimizer=muon", "train.strategy=fsdp"])
