"""The few-row layout of decoding's products (core/model/few_rows.py): the same numbers as F.linear, taken
only where the probe found it faster and only for inference, remembered per machine and shape."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from llmkit.core.config import ModelConfig, SampleConfig
from llmkit.core.decoding.steps import decode_batch
from llmkit.core.host import machine
from llmkit.core.model import fast, few_rows
from llmkit.core.model.few_rows import FewRowLinear, transposed_linear
from llmkit.core.model.transformer import Transformer

CFG = ModelConfig(vocab_size=97, d_model=48, n_layer=2, n_head=4, n_kv_head=2, context=64)


@pytest.mark.parametrize("shape", [(1, 40), (1, 1, 40), (3, 40), (2, 5, 40), (70, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_transposed_product_is_the_linear_product(shape, bias):
    torch.manual_seed(0)
    w, b = torch.randn(24, 40), torch.randn(24) if bias else None
    x = torch.randn(*shape)
    got = transposed_linear(x, w, b)
    assert got.shape == F.linear(x, w, b).shape and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_row_counts_between_probed_ones_follow_the_one_above():
    assert few_rows.fast_rows([1, 8]) == frozenset({1, 5, 6, 7, 8})
    assert few_rows.fast_rows([]) == frozenset()
    assert max(few_rows.fast_rows(list(few_rows.PROBED_ROWS))) == few_rows.PROBED_ROWS[-1]


def test_the_layer_takes_the_other_layout_only_for_inference_of_its_row_counts(monkeypatch):
    calls = []
    real = few_rows.transposed_linear
    monkeypatch.setattr(few_rows, "transposed_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    layer = FewRowLinear(40, 24)
    layer.fast_rows, layer.tuned_in = frozenset({1, 2}), threading.get_ident()
    x1, x3 = torch.randn(1, 1, 40), torch.randn(3, 40)
    layer(x1)  # autograd on: training never changes
    assert calls == []
    with torch.no_grad():
        layer(x3)  # not a fast row count
        assert calls == []
        out = layer(x1)
        assert calls == [(1, 1, 40)]
        torch.testing.assert_close(out, F.linear(x1, layer.weight, layer.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x1)  # autocast decides its own products
        assert len(calls) == 1
    with torch.inference_mode():
        layer(torch.randn(2, 40))
        assert len(calls) == 2
        other = threading.Thread(target=lambda: layer(x1))  # measured for this thread, not another
        other.start()
        other.join()
        assert len(calls) == 2


def test_tune_probes_once_per_machine_and_shape_and_remembers(monkeypatch):
    probed = []
    real = few_rows.probe
    monkeypatch.setattr(few_rows, "probe", lambda ws: probed.append(len(ws)) or {**real(ws), "faster": [1, 8]})
    key = "few_rows|" + machine.shape_key(CFG, 0)
    data = machine.read_cache()
    data.get(machine.machine_key(), {}).pop(key, None)  # probed afresh, whatever ran before
    machine.write_cache(data)
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    fast.for_decoding(model)
    # every linear weight once (the tied head is the embedding): 7 per block + the head
    assert probed == [7 * CFG.n_layer + 1]
    layers = [m for m in model.modules() if isinstance(m, FewRowLinear)]
    assert len(layers) == 7 * CFG.n_layer + 1 and all(m.fast_rows == {1, 5, 6, 7, 8} for m in layers)
    entry = machine.read_cache()[machine.machine_key()][key]
    assert entry["faster"] == [1, 8] and set(entry["timings"]) == {str(r) for r in few_rows.PROBED_ROWS}
    assert all(t["linear_ms"] > 0 and t["transposed_ms"] > 0 for t in entry["timings"].values())
    other = Transformer(CFG).eval()  # another model of the same shape: the cached answer
    fast.for_decoding(other)
    assert probed == [7 * CFG.n_layer + 1]
    assert all(m.fast_rows == {1, 5, 6, 7, 8} for m in other.modules() if isinstance(m, FewRowLinear))
    # another thread (a server decodes in one) neither probes nor changes anything
    fresh = Transformer(CFG).eval()
    worker = threading.Thread(target=fast.for_decoding, args=(fresh,))
    worker.start()
    worker.join()
    assert probed == [7 * CFG.n_layer + 1]
    assert all(not m.fast_rows for m in fresh.modules() if isinstance(m, FewRowLinear))
    low = Transformer(CFG).to(torch.bfloat16)  # not fp32: nothing to probe, nothing changes
    fast.for_decoding(low)
    assert probed == [7 * CFG.n_layer + 1]
    assert all(not m.fast_rows for m in low.modules() if isinstance(m, FewRowLinear))


def test_decoding_through_either_layout_gives_the_same_greedy_text(monkeypatch):
    """A random model with large weights (its greedy text turns on every logit): every row count
    forced through the transposed layout decodes what F.linear decodes, at batch 1 and 4."""
    torch.manual_seed(1)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(6)
    model._few_rows_tuned = True  # no probe: each layout is set by hand below
    fast.for_decoding(model)
    calls = []
    real = few_rows.transposed_linear
    monkeypatch.setattr(few_rows, "transposed_linear", lambda *a: calls.append(1) or real(*a))
    layers = [m for m in model.modules() if isinstance(m, FewRowLinear)]
    prompts = [[3, 14, 15, 92], [6, 5], [35, 8, 9, 7, 9, 3], [2]]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=40)

    def decode(rows: frozenset[int]) -> list[list[int]]:
        for m in layers:
            m.fast_rows, m.tuned_in = rows, threading.get_ident()
        one = [decode_batch(model, [p], cfg, eos_id=None, decode=str)[0].ids for p in prompts]
        return one + [o.ids for o in decode_batch(model, prompts, cfg, eos_id=None, decode=str)]

    transposed = decode(frozenset(range(1, 65)))
    assert len(calls) >= 40 * 8  # every step's products went the other way
    calls.clear()
    assert transposed == decode(frozenset()) and not calls


def test_a_layout_probed_on_a_busy_machine_is_probed_again_once_quiet(monkeypatch):
    """A layout timed while other work held the cores is provisional: used, but timed again when
    the machine is quiet, and a busy timing never replaces a quiet one."""
    state, probed, real = {"busy": True}, [], few_rows.probe
    monkeypatch.setattr(few_rows, "machine_busy", lambda: state["busy"])

    def fake(ws):
        probed.append(state["busy"])
        return {**real(ws), "faster": [1] if state["busy"] else [1, 8]}

    monkeypatch.setattr(few_rows, "probe", fake)
    key = "few_rows|" + machine.shape_key(CFG, 0)
    data = machine.read_cache()
    data.get(machine.machine_key(), {}).pop(key, None)
    machine.write_cache(data)

    def rows_of_a_new_model():
        model = Transformer(CFG).eval()
        fast.for_decoding(model)
        return next(m.fast_rows for m in model.modules() if isinstance(m, FewRowLinear))

    assert rows_of_a_new_model() == {1} and probed == [True]
    assert machine.read_cache()[machine.machine_key()][key]["busy"] is True
    assert rows_of_a_new_model() == {1} and probed == [True]  # still busy: the provisional answer
    state["busy"] = False
    assert rows_of_a_new_model() == {1, 5, 6, 7, 8} and probed == [True, False]  # quiet: timed again
    state["busy"] = True
    assert rows_of_a_new_model() == {1, 5, 6, 7, 8} and probed == [True, False]  # the quiet answer stands
