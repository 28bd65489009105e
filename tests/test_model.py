"""The transformer: causality, cached decoding, learning."""

import torch

from llmkit.core.model.transformer import KVCache, Transformer
from llmkit.core.training.loop import lm_loss


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def test_future_tokens_do_not_change_past_logits(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    x = torch.randint(0, tiny_model_cfg.vocab_size, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, tiny_model_cfg.vocab_size, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_kv_cache_decoding_matches_full_recompute(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    prompt = torch.randint(0, tiny_model_cfg.vocab_size, (1, 5))
    # Greedy with the cache, token by token.
    cache = KVCache(tiny_model_cfg, 1, tiny_model_cfg.context)
    seq = prompt.clone()
    with torch.no_grad():
        logits = model(seq, cache=cache, pos=0)[:, -1]
        cached_logits = []
        for _ in range(20):
            cached_logits.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, cache=cache, pos=seq.size(1) - 1)[:, -1]
        # The same sequence recomputed in full at every step.
        for i, cl in enumerate(cached_logits):
            full = model(seq[:, : prompt.size(1) + i])[:, -1]
            assert torch.allclose(cl, full, atol=1e-5), f"step {i}"
            assert cl.argmax() == full.argmax()


def test_chunked_prefill_with_cache_matches_full(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    x = torch.randint(0, tiny_model_cfg.vocab_size, (2, 20))
    cache = KVCache(tiny_model_cfg, 2, 20)
    with torch.no_grad():
        a = model(x[:, :8], cache=cache, pos=0)
        b = model(x[:, 8:], cache=cache, pos=8)  # T > 1 new tokens after a cached past
        full = model(x)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)


def test_loss_on_a_fixed_batch_falls(tiny_model_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, tiny_model_cfg.vocab_size, (4, 33))
    losses = []
    for _ in range(30):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tied_embeddings_share_one_tensor(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    assert model.lm_head.weight is model.embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once


def test_the_model_file_is_plain_pytorch():
    """The performance machinery stays outside the network's definition (core/model/fast.py)."""
    import ast
    from pathlib import Path

    import llmkit.core.model.transformer as t

    tree = ast.parse(Path(t.__file__).read_text())
    ours = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("llmkit")}
    assert ours == {"llmkit.core.config"}, ours
    assert not any(isinstance(n, ast.Attribute) and n.attr in ("bfloat16", "get_ident") for n in ast.walk(tree))


def test_outputs_are_identical_with_the_performance_switch_on_or_off(tiny_model_cfg, monkeypatch):
    from llmkit.core.config import SampleConfig
    from llmkit.core.decoding.steps import decode_batch
    from llmkit.core.model import fast

    def run(plain: str):
        monkeypatch.setenv("LLMKIT_PLAIN", plain)
        torch.manual_seed(0)
        with fast.building():  # off: weights initialised, then overwritten all the same
            model = Transformer(tiny_model_cfg)
        model.load_state_dict(reference)
        model = fast.for_training(model.eval())
        with torch.no_grad():
            logits = model(x)
        out = decode_batch(
            model,
            [[1, 2, 3], [4, 5]],
            SampleConfig(max_new_tokens=12, temperature=0.0),
            eos_id=None,
            decode=lambda ids: " ".join(map(str, ids)),
        )
        return logits, [o.ids for o in out], type(model.blocks[0].attn).__name__

    torch.manual_seed(1)
    reference = Transformer(tiny_model_cfg).state_dict()
    x = torch.randint(0, tiny_model_cfg.vocab_size, (3, 24))
    fast_logits, fast_tokens, fast_attn = run("0")
    plain_logits, plain_tokens, plain_attn = run("1")
    assert (fast_attn, plain_attn) == ("Fp32CpuAttention", "Attention")
    assert torch.equal(fast_logits, plain_logits)
    assert fast_tokens == plain_tokens
