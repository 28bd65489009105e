"""The transformer: causality, cached decoding, learning."""

import torch

from llmkit.core.model import KVCache, Transformer
from llmkit.core.train import lm_loss


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
