"""The speed probe's choices, and every fast training path against the plain one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmkit.core.config import ModelConfig, OptimConfig
from llmkit.core.host import machine
from llmkit.core.model.transformer import Transformer
from llmkit.core.training import speed
from llmkit.core.training.loop import mean_token_loss, next_token_loss, target_loss
from llmkit.core.training.optim import make_optimizer
from llmkit.core.training.speed import Mode, Timing

CFG = ModelConfig(vocab_size=97, context=16, d_model=32, n_layer=2, n_head=2, n_kv_head=1)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test starts with no recorded timings."""
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))


class FakeTimer:
    """Pretend timings per mode; counts the calls (a cached figure must not be re-measured)."""

    def __init__(self, **rates):
        self.rates, self.calls = rates, []

    def __call__(self, cfg, batch, mode: Mode) -> Timing:
        self.calls.append(mode.name)
        rate, compile_s = self.rates[mode.name]
        return Timing(rate, compile_s=compile_s, cold_compile_s=compile_s * 5)


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)


def _choose(timer, budget_s=600.0, **kw):
    return speed.choose(CFG, 4, budget_s=budget_s, tokens_per_step=64, timer=timer, **kw)


def test_bf16_chosen_when_faster_and_cached(bf16_cpu):
    timer = FakeTimer(**{"fp32": (1000, 0), "bf16": (2000, 0), "fp32+compile": (1100, 10), "bf16+compile": (2100, 10)})
    first = _choose(timer)
    assert (first.precision, first.compiled) == ("bf16", False)  # compiling gains 5%, costs 10 s of 600
    assert "measured" in first.reason
    assert timer.calls == ["fp32", "bf16", "bf16+compile"]  # one cold compile: the fastest precision's
    again = _choose(timer)
    assert (again.precision, again.compiled) == ("bf16", False) and "cached" in again.reason
    assert len(timer.calls) == 3  # nothing measured twice
    assert json.loads((machine.cache_path()).read_text())["version"] == machine.CACHE_VERSION


def test_a_tie_keeps_plain_fp32(bf16_cpu):
    timer = FakeTimer(fp32=(1000, 0), bf16=(1030, 0))
    choice = _choose(timer, budget_s=60)
    assert (choice.precision, choice.compiled) == ("fp32", False)


def test_compilation_chosen_only_when_it_pays_within_the_budget(bf16_cpu):
    rates = {"fp32": (1000, 0), "bf16": (1000, 0), "fp32+compile": (1500, 100), "bf16+compile": (1500, 100)}
    long = _choose(FakeTimer(**rates), budget_s=3600)
    assert (long.precision, long.compiled) == ("fp32", True) and "compilation 100 s" in long.reason
    # Same figures (now cached), a budget too short to earn the 100 s back: eager.
    short = _choose(FakeTimer(**rates), budget_s=250)
    assert short.compiled is False


def test_short_runs_never_probe_compilation_cold(bf16_cpu):
    timer = FakeTimer(fp32=(1000, 0), bf16=(900, 0))
    choice = _choose(timer, budget_s=60)
    assert timer.calls == ["fp32", "bf16"] and choice.compiled is False


def test_step_budgets_are_sized_by_the_eager_rate(bf16_cpu):
    rates = {"fp32": (1000, 0), "bf16": (500, 0), "fp32+compile": (2000, 5)}
    timer = FakeTimer(**rates)
    # 10 steps of 64 tokens at 1000 tokens/s: under a second, too short to probe compilation.
    assert _choose(timer, budget_s=None, steps=10).compiled is False and "fp32+compile" not in timer.calls
    # 100,000 steps: long enough; compilation pays.
    assert _choose(timer, budget_s=None, steps=100_000).compiled is True


def test_a_mode_that_fails_is_never_chosen(bf16_cpu):
    def timer(cfg, batch, mode):
        if mode.compiled:
            return Timing(0.0, error="RuntimeError: no C++ compiler")
        return Timing(1000.0)

    choice = _choose(timer, budget_s=3600)
    assert choice.compiled is False and "unavailable" in choice.reason


def test_fixed_settings_restrict_the_choice(bf16_cpu):
    timer = FakeTimer(fp32=(1000, 0), bf16=(3000, 0))
    assert _choose(timer, precision="fp32", compile="false").precision == "fp32"
    assert timer.calls == []  # one candidate: nothing to measure
    assert _choose(timer, compile="false").precision == "bf16"


def test_without_bf16_units_a_short_run_is_not_probed(monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: False)
    timer = FakeTimer()
    choice = _choose(timer, budget_s=60)
    assert (choice.precision, choice.compiled, timer.calls) == ("fp32", False, [])
    assert "no native bf16" in choice.reason


def test_the_real_probe_times_a_step():
    t = speed.time_mode(CFG, 2, Mode("fp32", False), steps=2)
    assert t.tokens_per_s > 0 and not t.error and t.compile_s == 0


def test_machine_key_names_cpu_torch_and_threads():
    key = machine.machine_key()
    assert f"torch {torch.__version__}" in key and f"threads {torch.get_num_threads()}" in key
    assert f"kernels {torch.backends.cpu.get_cpu_capability()}" in key


def test_machine_key_tells_an_instruction_set_cap(monkeypatch):
    """A processor whose kernel libraries are capped (to AVX2, say) runs another machine's code:
    its measurements must not be read back uncapped, nor the reverse."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    free = machine.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = machine.machine_key()
    assert capped != free and capped.endswith("ONEDNN_MAX_CPU_ISA=AVX2")


def test_machine_key_follows_atens_capability():
    """ATEN_CPU_CAPABILITY=avx2 (what benchmarks' --isa avx2 sets) lowers the kernels torch
    dispatches to, and the key says so: an AVX-512 machine's capped figures get a key of their own."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    env["ATEN_CPU_CAPABILITY"] = "avx2"
    key = subprocess.run(
        [sys.executable, "-c", "from llmkit.core.host import machine; print(machine.machine_key())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    own = torch.backends.cpu.get_cpu_capability()
    # A cap never raises the level: a machine below AVX2 keeps its own.
    assert key.endswith(f"kernels {'AVX2' if own in ('AVX2', 'AVX512') else own}")


# --- fast paths against plain ones ---------------------------------------------------------------


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG.__dict__, **over})).train()


def test_bf16_autocast_logits_follow_fp32():
    model = _model().eval()
    x = torch.randint(0, CFG.vocab_size, (3, CFG.context))
    with torch.no_grad():
        plain = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert (low - plain).abs().max() < 0.05 * plain.abs().max()
    # Attention itself runs in fp32 under bf16 (torch's CPU kernel is slow backward in bf16):
    # gradients flow and agree in direction with fp32's.
    y = torch.randint(0, CFG.vocab_size, (3, CFG.context))
    grads = []
    for amp in (False, True):
        m = _model()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(m(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_fused_rmsnorm_equals_the_written_out_formula():
    from llmkit.core.model.transformer import Norm

    norm = Norm(32, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 7, 32)
    manual = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), manual, atol=1e-6)
    assert torch.allclose(norm(x.bfloat16()).float(), manual, atol=0.05)  # the cast-first path


def test_fused_adamw_follows_the_default_one():
    x = torch.randint(0, CFG.vocab_size, (2, CFG.context))
    y = torch.randint(0, CFG.vocab_size, (2, CFG.context))
    params = []
    for fused in (True, False):
        m = _model()
        opt = make_optimizer(m, OptimConfig(lr=1e-2))
        if not fused:
            opt = torch.optim.AdamW(opt.param_groups, lr=1e-2, betas=opt.defaults["betas"], eps=opt.defaults["eps"])
        else:
            assert opt.defaults["fused"] is True
        for _ in range(3):
            F.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
            opt.zero_grad()
        params.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_the_loss_at_target_positions_only_is_the_full_loss():
    """Fine-tuning's loss skips the LM head where there is no target (masked prompts, padding):
    the same value and the same gradients as scoring every position."""
    x = torch.randint(0, CFG.vocab_size, (3, CFG.context))
    y = torch.randint(0, CFG.vocab_size, (3, CFG.context))
    y[0, :20] = -100  # a masked prompt
    y[1, 5:] = -100  # padding after a short row
    y[2, ::3] = -100  # scattered
    grads = []
    for loss_fn in (next_token_loss, target_loss):
        m = _model()
        loss = loss_fn(m, x, y)
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_eval_standard_error_is_the_spread_of_window_means():
    model = _model().eval()
    x = torch.randint(0, CFG.vocab_size, (6, CFG.context))
    y = torch.randint(0, CFG.vocab_size, (6, CFG.context))
    got = mean_token_loss(model, [(x[:4], y[:4]), (x[4:], y[4:])], "cpu")
    with torch.no_grad():
        per_token = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(6, -1)
    rows = per_token.mean(1)
    assert got.tokens == 6 * CFG.context
    assert math.isclose(got.loss, per_token.mean().item(), rel_tol=1e-5)
    assert math.isclose(got.se, (rows.std() / math.sqrt(6)).item(), rel_tol=1e-4)
    assert mean_token_loss(model, [(x[:1], y[:1])], "cpu").se is None


@pytest.mark.slow
def test_compiled_training_matches_eager():
    x = torch.randint(0, CFG.vocab_size, (2, CFG.context))
    eager, compiled = _model().eval(), _model().eval()
    net = torch.compile(compiled)
    with torch.no_grad():
        assert torch.allclose(net(x), eager(x), atol=1e-4)


# --- the budget-sized recipe ----------------------------------------------------------------------


def test_recipe_params_match_a_built_model():
    from llmkit.core.training import recipe

    for shape in recipe.LADDER[:4]:
        cfg = shape.model(CFG, 512)
        assert recipe.params(cfg) == Transformer(cfg).num_params()


def test_recipe_grows_the_model_with_the_budget():
    from llmkit.core.config import RunConfig
    from llmkit.core.training import recipe

    cfg = RunConfig()
    rate = lambda model_cfg, batch: 20_000.0  # noqa: E731 - tokens/s of the smallest shape
    picks = [
        recipe.size_for_budget(cfg, 4096, seconds=s, tokens=None, rate=rate).shape.name for s in (10, 180, 1800, 36_000)
    ]
    sizes = [recipe.LADDER.index(next(x for x in recipe.LADDER if x.name == p)) for p in picks]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    sized = recipe.size_for_budget(cfg, 4096, seconds=1800, tokens=None, rate=rate)
    row = next(r for r in sized.table if r["shape"] == sized.shape.name)
    assert row["tokens_per_param"] >= recipe.TOKENS_PER_PARAM or sized.shape == recipe.LADDER[0]
    bigger = recipe.LADDER[recipe.LADDER.index(sized.shape) + 1].name
    assert next(r for r in sized.table if r["shape"] == bigger)["tokens_per_param"] < recipe.TOKENS_PER_PARAM
    # a token budget needs no timing at all
    by_tokens = recipe.size_for_budget(cfg, 4096, seconds=None, tokens=50_000_000, rate=None)
    assert by_tokens.shape != recipe.LADDER[0]
    # what the user set stays
    applied = recipe.apply(cfg, sized, frozenset({"optim.lr"}))
    assert applied.model.d_model == sized.shape.d_model and applied.optim.lr == cfg.optim.lr


def test_a_resumed_run_keeps_its_mode_and_fixed_settings_skip_the_probe(bf16_cpu, monkeypatch):
    from llmkit.core.config import RunConfig

    monkeypatch.setattr(speed, "choose", lambda *a, **k: pytest.fail("no probe expected"))
    cfg = RunConfig().replace("model", vocab_size=97)
    cpu = torch.device("cpu")
    precision, compiled = speed.plan(cfg, cpu, distributed=False, resumed={"precision": "bf16", "compiled": True})
    assert (precision.name, compiled) == ("bf16", True) and "resumed" in precision.reason
    fixed = cfg.replace("train", dtype="fp32", compile="false")
    precision, compiled = speed.plan(fixed, cpu, distributed=False, resumed=None)
    assert (precision.name, compiled) == ("fp32", False)
    # under torchrun every process follows the rule, none probes
    precision, compiled = speed.plan(cfg, cpu, distributed=True, resumed=None)
    assert compiled is False


# --- the in-place probe: the run's own model, a slice of its own batch -----------------------------


class _Task:
    """A language-modelling task's surface: a fixed first batch and the loop's loss call."""

    def __init__(self, rows=8):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, CFG.vocab_size, (rows, CFG.context), generator=gen)  # (B, T)
        self.y = torch.randint(0, CFG.vocab_size, (rows, CFG.context), generator=gen)  # (B, T)

    def train_batch(self, step, part, parts):
        return self.x, self.y

    def loss(self, forward, batch):
        x, y = batch
        return forward(next_token_loss, x, y), y.numel()


def test_the_in_place_probe_builds_nothing_and_leaves_the_model_as_it_was(monkeypatch):
    monkeypatch.setattr(speed, "Transformer", lambda *a, **k: pytest.fail("the probe built a second model"))
    model = _model(dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe = speed.InPlace(model, _Task(), torch.device("cpu"), "lm")
    t = probe(CFG, probe.rows, Mode("fp32", False))
    assert t.tokens_per_s > 0 and not t.error and probe.tokens == 8 * CFG.context  # a cheap batch: all of it
    monkeypatch.setattr(speed, "PROBE_FULL_BATCH_FLOPS", 0)  # a large model's batch: its first rows only
    sliced = speed.InPlace(model, _Task(), torch.device("cpu"), "lm")
    sliced(CFG, sliced.rows, Mode("fp32", False))
    assert sliced.rows == speed.PROBE_ROWS and sliced.tokens == speed.PROBE_ROWS * CFG.context
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws put back: the run is the same probed or not
    assert probe.key(CFG).startswith("run|lm|") and probe.key(CFG).endswith("trainable1.00")


def test_a_run_never_compiles_cold_on_a_guess(bf16_cpu, monkeypatch):
    """With the in-place probe, compiled modes left at auto are weighed from cached figures only,
    however long the budget."""
    from llmkit.core.config import RunConfig

    calls = []
    model = _model()

    class Probe(speed.InPlace):
        def __call__(self, cfg, batch, mode):
            calls.append(mode.name)
            self.tokens = 64
            return Timing({"fp32": 1000.0, "bf16": 2500.0}.get(mode.name, 5000.0))

    probe = Probe(model, _Task(), torch.device("cpu"), "lm")
    cfg = RunConfig().replace("model", **CFG.__dict__).replace("train", time="10h")
    precision, compiled = speed.plan(cfg, torch.device("cpu"), distributed=False, resumed=None, probe=probe)
    assert calls == ["fp32", "bf16"] and (precision.name, compiled) == ("bf16", False)
    assert "rows of the first batch" in precision.reason
    # asked for explicitly, compilation is measured in place, and the figure serves later auto runs
    speed.plan(cfg.replace("train", compile="true"), torch.device("cpu"), distributed=False, resumed=None, probe=probe)
    assert "bf16+compile" in calls
    calls.clear()
    precision, compiled = speed.plan(cfg, torch.device("cpu"), distributed=False, resumed=None, probe=probe)
    assert calls == [] and compiled is True and "cached" in precision.reason


def test_a_busy_figure_never_replaces_a_quiet_one(bf16_cpu, monkeypatch):
    state = {"busy": False}
    monkeypatch.setattr(speed, "busy", lambda: state["busy"])

    def timer(cfg, batch, mode):
        rate = {"fp32": 1000.0, "bf16": 2000.0}[mode.name] / (4 if state["busy"] else 1)
        return Timing(rate, busy=state["busy"])

    assert _choose(timer, budget_s=60).precision == "bf16"  # quiet figures recorded
    state["busy"] = True
    again = _choose(FakeTimer(), budget_s=60)  # busy now: the quiet figures are read, nothing measured
    assert again.precision == "bf16" and "cached" in again.reason
    # a cache that only holds busy figures is measured again once the machine is quiet
    entry = json.loads(machine.cache_path().read_text())
    for shape in entry[machine.machine_key()].values():
        for fig in shape.values():
            fig["busy"] = True
    machine.write_cache(entry)
    state["busy"] = False
    timer2 = FakeTimer(fp32=(1000, 0), bf16=(3000, 0))
    assert _choose(timer2, budget_s=60).precision == "bf16" and timer2.calls == ["fp32", "bf16"]


def test_torchrun_says_why_it_does_not_probe(bf16_cpu):
    from llmkit.core.config import RunConfig

    cfg = RunConfig().replace("model", vocab_size=97)
    precision, _ = speed.plan(cfg, torch.device("cpu"), distributed=True, resumed=None)
    assert "under torchrun the ranks follow this rule" in precision.reason
