"""Structured outputs: a random model (which never writes valid JSON by chance) kept inside choices,
regular expressions and JSON schemas by the grammar engine, batched or alone, sampled or greedy."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llmkit.core.config import ModelConfig, SampleConfig
from llmkit.core.decoding.steps import SlotJob, Slots, decode_batch, row_seed
from llmkit.core.decoding.structure import Structure, StructureError, compile_structure, from_options
from llmkit.core.model.transformer import Transformer
from tests.conftest import need_module

SCHEMAS = {
    "nested object, optional fields": {
        "type": "object",
        "properties": {
            "nom": {"type": "string", "maxLength": 6},
            "adresse": {
                "type": "object",
                "properties": {"ville": {"type": "string", "maxLength": 5}, "code": {"type": "integer"}},
                "required": ["ville"],
                "additionalProperties": False,
            },
            "actif": {"type": "boolean"},
        },
        "required": ["nom", "adresse"],
        "additionalProperties": False,
    },
    "array of enums": {
        "type": "object",
        "properties": {
            "genres": {
                "type": "array",
                "items": {"enum": ["comédie", "tragédie", "drame"]},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["genres"],
        "additionalProperties": False,
    },
    "numbers with bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "note": {"type": "number", "minimum": 0, "maximum": 20},
            "rang": {"type": "integer", "exclusiveMinimum": 0, "maximum": 5},
        },
        "required": ["age", "note", "rang"],
        "additionalProperties": False,
    },
    "array of objects, nullable": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "mot": {"type": "string", "maxLength": 4},
                "poids": {"type": ["number", "null"], "minimum": -9, "maximum": 9},
            },
            "required": ["mot", "poids"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
}


@pytest.fixture
def random_model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context=256, d_model=32, n_layer=2, n_head=2, n_kv_head=1)
    return Transformer(cfg).eval()


def _decode(model, tok, structure, prompts, *, seeds, **sample):
    cfg = SampleConfig(**{"max_new_tokens": 160, "temperature": 1.0, "top_k": 0, **sample})
    compiled = compile_structure(structure, tok, tok.eos_id)
    return decode_batch(model, prompts, cfg, eos_id=tok.eos_id, decode=tok.decode, seeds=seeds, structure=compiled)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_sampled_answer_of_a_random_model_fits_the_schema(random_model, tokenizer, name):
    jsonschema = need_module("jsonschema", "the reference validator of JSON schemas")
    schema = SCHEMAS[name]
    prompts = [tokenizer.encode_text("Réponds en JSON :")] * 50  # 4 schemas x 50 = 200 generations
    outs = _decode(random_model, tokenizer, Structure.json_schema(schema), prompts, seeds=list(range(50)))
    for out in outs:
        assert out.complete, out.text
        jsonschema.validate(json.loads(out.text), schema)  # raises on the first answer that does not fit
    assert len({o.text for o in outs}) > 10, "the draws differ: the constraint did not force one answer"


def test_any_json_object_parses(random_model, tokenizer):
    outs = _decode(
        random_model,
        tokenizer,
        Structure.json_object(),
        [[tokenizer.bos_id]] * 20,
        seeds=list(range(20)),
        max_new_tokens=400,
        top_k=20,
    )
    done = [o for o in outs if o.complete]
    assert len(done) >= 10, [o.text for o in outs]  # free strings can outrun a budget: those say so
    for out in done:
        assert isinstance(json.loads(out.text), dict)
    for out in outs:
        if not out.complete:
            assert out.finish_reason == "length"


def test_choices_always_return_one_of_them(random_model, tokenizer):
    options = ["oui", "non", "peut-être", "je ne sais pas", "Ça dépend"]
    outs = _decode(
        random_model, tokenizer, Structure.choices(options), [[tokenizer.bos_id]] * 40, seeds=list(range(40))
    )
    assert all(o.text in options and o.complete and o.finish_reason in ("stop", "eos") for o in outs)
    assert len({o.text for o in outs}) >= 3


@pytest.mark.parametrize(
    "pattern", [r"[0-9]{2}/[0-9]{2}/[0-9]{4}", r"0[1-9]( [0-9]{2}){4}", r"[a-z]{1,8}@[a-z]{2,6}\.fr", r"(Paris|Lyon)!?"]
)
def test_regexes_always_match(random_model, tokenizer, pattern):
    outs = _decode(random_model, tokenizer, Structure.regex(pattern), [[tokenizer.bos_id]] * 20, seeds=list(range(20)))
    for out in outs:
        assert re.fullmatch(pattern, out.text), out.text


def test_batched_structured_decoding_equals_one_at_a_time(random_model, tokenizer):
    structure = Structure.json_schema(SCHEMAS["nested object, optional fields"])
    prompts = [tokenizer.encode_text(t) for t in ("Bonjour", "Une adresse à Lyon :", "x")]
    seeds = [row_seed(7, i) for i in range(3)]
    together = _decode(random_model, tokenizer, structure, prompts, seeds=seeds)
    alone = [_decode(random_model, tokenizer, structure, [p], seeds=[s])[0] for p, s in zip(prompts, seeds)]
    assert [o.ids for o in together] == [o.ids for o in alone]
    greedy = [_decode(random_model, tokenizer, structure, prompts, seeds=seeds, temperature=0)[i].ids for i in range(3)]
    assert greedy == [
        _decode(random_model, tokenizer, structure, [p], seeds=[0], temperature=0)[0].ids for p in prompts
    ]


def test_continuous_batching_keeps_each_row_to_its_own_structure(random_model, tokenizer):
    """The server's path: rows with different structures (and none) share a batch."""
    tok = tokenizer
    cfg = SampleConfig(max_new_tokens=60, temperature=1.0, top_k=0)
    choices = compile_structure(Structure.choices(["alpha", "bêta"]), tok, tok.eos_id)
    date = compile_structure(Structure.regex(r"[0-9]{4}-[0-9]{2}"), tok, tok.eos_id)
    slots = Slots(random_model, 3, cfg, eos_id=tok.eos_id, decode=tok.decode)
    jobs = [
        SlotJob(tok.encode_text("a"), 1, 60, structure=choices),
        SlotJob(tok.encode_text("b"), 2, 60),
        SlotJob(tok.encode_text("c"), 3, 60, structure=date),
    ]
    outs = slots.admit(jobs)
    while slots.live:
        slots.step()
    assert outs[0].text in ("alpha", "bêta") and re.fullmatch(r"[0-9]{4}-[0-9]{2}", outs[2].text)
    assert outs[1].complete is None
    alone = _decode(
        random_model, tok, Structure.regex(r"[0-9]{4}-[0-9]{2}"), [jobs[2].ids], seeds=[3], max_new_tokens=60
    )
    assert outs[2].ids == alone[0].ids


def test_penalties_filters_and_stop_strings_still_apply(random_model, tokenizer):
    structure = Structure.json_schema(SCHEMAS["array of enums"])

    def draw(n, **sample):
        return _decode(random_model, tokenizer, structure, [[tokenizer.bos_id]] * n, seeds=list(range(n)), **sample)

    outs = draw(10, repetition_penalty=1.3, top_p=0.9, min_p=0.05, frequency_penalty=0.5)
    assert all(json.loads(o.text)["genres"] for o in outs)
    for out in draw(5, stop=("comédie",)):
        assert "comédie" not in out.text


def test_a_budget_that_runs_out_inside_the_answer_says_so(random_model, tokenizer):
    out = _decode(
        random_model,
        tokenizer,
        Structure.json_schema(SCHEMAS["numbers with bounds"]),
        [[tokenizer.bos_id]],
        seeds=[0],
        max_new_tokens=4,
    )[0]
    assert out.complete is False and out.finish_reason == "length" and out.text.startswith("{")


def test_structures_the_engine_cannot_compile_are_one_line(tokenizer):
    for bad, source in (
        (Structure.regex("(unclosed"), "--regex"),
        (Structure.json_schema({"type": "objet"}), "--json-schema"),
    ):
        with pytest.raises(StructureError, match=re.escape(source)) as e:
            compile_structure(bad, tokenizer, tokenizer.eos_id)
        assert "\n" not in str(e.value)
    with pytest.raises(StructureError, match="one of"):
        from_options(choices="a|b", regex="x")
    with pytest.raises(StructureError, match="no empty one"):
        Structure.choices(["a", ""])
    with pytest.raises(StructureError, match="JSON object"):
        Structure.json_schema([1])


def test_token_bytes_spell_the_text_for_sentencepiece_and_byte_level_vocabularies(tokenizer):
    text = 'Élève, où êtes-vous ? 42 €, 🙂 {"a": [1, 2.5e3]}\n\tfin'
    table = tokenizer.token_bytes()
    assert b"".join(table[i] for i in tokenizer.encode(text)) == text.encode()
    assert table[tokenizer.eos_id] is None and len(table) == tokenizer.vocab_size
    tokenizers = need_module("tokenizers", "the byte-level BPE backend")
    from llmkit.core.text.tokenizer import Tokenizer

    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator([text * 3, "La capitale de la France est Paris."], trainer)
    tk = Tokenizer(
        hf.to_str().encode(),
        {"backend": "hf", "vocab_size": hf.get_vocab_size(), "special_ids": {"eos": 0, "bos": 0, "pad": 0}},
    )
    table = tk.token_bytes()
    assert table[0] is None
    assert b"".join(table[i] for i in tk.encode(text)) == text.encode()


def test_generate_cli_choices_regex_schema_and_refusals(trained_run, tmp_path):
    from typer.testing import CliRunner

    from llmkit.cli.app import app

    run = CliRunner()
    r = run.invoke(app, ["generate", str(trained_run), "-p", "Le", "--choices", "oui|non", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n").removeprefix("Le") in ("oui", "non")
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS["array of enums"]), encoding="utf-8")
    r = run.invoke(
        app,
        [
            "generate",
            str(trained_run),
            "--json-schema",
            str(schema),
            "--json",
            "-n",
            "80",
            "--prompt",
            "Genre :",
            "--seed",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout.splitlines()[0])
    assert row["complete"] is True and json.loads(row["text"])["genres"]
    r = run.invoke(app, ["generate", str(trained_run), "--json-schema", str(schema), "-n", "2", "-p", "x"])
    assert r.exit_code == 1 and "ran out of tokens (--max-new-tokens 2)" in r.output
    for args, says in (
        (["--regex", "a", "--choices", "a|b"], "not several"),
        (["--choices", "a|b", "--num-beams", "2"], "cannot be combined with --num-beams"),
    ):
        r = run.invoke(app, ["generate", str(trained_run), "-p", "x", *args])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output
    (tmp_path / "c.txt").write_text("A | B\nC\n", encoding="utf-8")
    r = run.invoke(app, ["generate", str(trained_run), "-p", "", "--choices", f"@{tmp_path / 'c.txt'}", "--seed", "2"])
    assert r.exit_code == 0 and r.stdout.strip() in ("A | B", "C"), r.output


TOOL = {
    "type": "function",
    "function": {
        "name": "meteo",
        "description": "La météo d'une ville.",
        "parameters": {
            "type": "object",
            "properties": {"ville": {"enum": ["Paris", "Brest"]}},
            "required": ["ville"],
            "additionalProperties": False,
        },
    },
}
WITH_TOOLS = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _with_template(tokenizer, template):
    from llmkit.core.text.tokenizer import Tokenizer

    return Tokenizer(tokenizer.model_bytes, {**tokenizer.contract, "chat_template": template})


def test_tools_reach_the_model_through_its_template_or_a_system_message(tokenizer):
    need_module("jinja2", "chat templates")
    from llmkit.core.decoding.decoder import Prompts
    from llmkit.core.decoding.tools import read_tools

    tools = read_tools([TOOL])
    own = _with_template(tokenizer, WITH_TOOLS)
    text = own.decode(Prompts(own, "chat").turns([("user", "Il pleut ?")], tools))
    assert "<tools>meteo;</tools>" in text and "You can call" not in text  # the template's own format
    plain = _with_template(tokenizer, WITH_TOOLS.split("{% endif %}", 1)[1])  # the same without tools
    text = plain.decode(Prompts(plain, "chat").turns([("system", "Sois bref."), ("user", "Il pleut ?")], tools))
    assert text.startswith("<system>Sois bref.\n\nYou can call these functions:") and '"name": "meteo"' in text
    assert "<tool_call>" in text and text.count("<system>") == 1


def test_tool_calls_are_held_to_their_schemas_and_read_back(random_model, tokenizer):
    from llmkit.core.decoding.tools import call_text, parse_calls, read_tools, tool_structure

    no_args = {"type": "object", "properties": {}, "additionalProperties": False}
    tools = read_tools([TOOL, {"type": "function", "function": {"name": "heure", "parameters": no_args}}])
    outs = _decode(random_model, tokenizer, tool_structure(tools, "required", parallel=False),
                   [[tokenizer.bos_id]] * 12, seeds=list(range(12)), max_new_tokens=120)  # fmt: skip
    for out in outs:
        assert out.complete, out.text
        content, calls = parse_calls(out.text)
        assert content == "" and len(calls) == 1 and calls[0].name in ("meteo", "heure")
        if calls[0].name == "meteo":
            assert json.loads(calls[0].arguments)["ville"] in ("Paris", "Brest")
    assert {parse_calls(o.text)[1][0].name for o in outs} == {"meteo", "heure"}
    written = call_text("meteo", '{"ville": "Paris"}')
    assert parse_calls("Voici : " + written)[1][0].arguments == '{"ville": "Paris"}'
    assert parse_calls("<tool_call>pas du JSON</tool_call>") == ("<tool_call>pas du JSON</tool_call>", [])
    compiled = compile_structure(tool_structure(tools, "meteo"), tokenizer, tokenizer.eos_id)
    loose = compiled.matcher()  # one style: the compact form is not a call
    assert not (loose.m.consume_tokens(tokenizer.encode('<tool_call>{"name":"meteo"')) and loose.complete)
    with pytest.raises(StructureError, match="not one of the tools"):
        tool_structure(tools, "absente")
    with pytest.raises(StructureError, match="same name"):
        read_tools([TOOL, TOOL])
