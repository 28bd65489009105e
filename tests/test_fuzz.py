"""Fuzzing the readers of what strangers send: GGUF headers, config.json, chat templates and the
server's request parser. Whatever the input, the answer is a value or llmkit's own one-line
error (``LlmkitError``, or ``ApiError`` on the server): never another exception, a hang or an
allocation the input sized. Bounded: a fixed number of examples each, no deadline surprises in CI.
"""

from __future__ import annotations

import json
import struct

import pytest
from conftest import need_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit.core.errors import LlmkitError

FAST = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
HF_KEYS = [
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "head_dim",
    "rope_scaling",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "rope_parameters",
]
GOOD_HF = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 300,
    "max_position_embeddings": 128,
}


@FAST
@given(changes=st.dictionaries(st.sampled_from(HF_KEYS), values, max_size=4), whole=st.one_of(st.none(), values))
def test_config_json_of_any_shape_is_a_config_or_one_line(changes, whole):
    from llmkit.core.config import ModelConfig, build_section
    from llmkit.core.interop.hf import config_from_hf

    hf = whole if whole is not None and not isinstance(whole, dict) else {**GOOD_HF, **changes}
    try:
        section = config_from_hf(hf, "config.json")
        build_section(ModelConfig, section, "model")
    except LlmkitError:
        pass


def _kv(key: bytes, kind: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", kind) + payload


gguf_values = st.one_of(
    st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12]), st.binary(max_size=8)),
    st.tuples(
        st.just(8), st.builds(lambda n, b: struct.pack("<Q", n) + b, st.integers(0, 2**64 - 1), st.binary(max_size=16))
    ),
    st.tuples(
        st.just(9),
        st.builds(
            lambda t, n, b: struct.pack("<IQ", t, n) + b,
            st.integers(0, 12),
            st.integers(0, 2**64 - 1),
            st.binary(max_size=32),
        ),
    ),
    st.tuples(st.integers(13, 2**32 - 1), st.binary(max_size=8)),
)


@FAST
@given(
    tensors=st.integers(0, 2**64 - 1),
    kvs=st.lists(st.tuples(st.binary(max_size=12), gguf_values), max_size=4),
    tail=st.binary(max_size=64),
    keys=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_a_gguf_header_of_any_bytes_is_read_or_refused_in_one_line(tmp_path_factory, tensors, kvs, tail, keys):
    need_module("gguf", "GGUF files")
    from llmkit.core.interop.gguf_io import open_reader, read_fields

    body = b"".join(_kv(k, kind, payload) for k, (kind, payload) in kvs)
    data = b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs) if keys is None else keys) + body + tail
    path = tmp_path_factory.mktemp("g") / "f.gguf"
    path.write_bytes(data)
    try:
        read_fields(open_reader(path))
    except LlmkitError:
        pass


@FAST
@given(
    template=st.text(alphabet=st.sampled_from(list("{}%#()[]'\"+-*/|.,:_ ~0123456789abcdefijnorstx\n")), max_size=60)
)
def test_a_chat_template_of_any_text_renders_or_is_one_line(template):
    need_module("jinja2", "chat templates")
    from llmkit.core.text import templates

    class Tok:
        chat_template, bos_id, eos_id = template or "x", 0, 1

        def id_to_piece(self, i):
            return "<s>"

    try:
        templates.render(Tok(), [("user", "Bonjour"), ("assistant", "Salut")])
    except LlmkitError:
        pass


@FAST
@given(
    body=st.dictionaries(
        st.sampled_from(
            [
                "max_tokens",
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "seed",
                "n",
                "stop",
                "presence_penalty",
                "frequency_penalty",
                "repetition_penalty",
                "no_repeat_ngram",
                "best_of",
                "logprobs",
                "messages",
                "prompt",
            ]
        ),
        values,
        max_size=5,
    )
)
def test_a_request_body_of_any_shape_is_parsed_or_a_400(body):
    need_module("fastapi", "the HTTP server")
    from llmkit.serve.protocol import ApiError, Limits, n_of, sampling, texts, top_logprobs
    from llmkit.serve.server import turns_of

    for parse in (
        lambda: sampling(body, Limits(), 16),
        lambda: n_of(body, Limits()),
        lambda: top_logprobs(body, "logprobs"),
        lambda: texts(body.get("prompt", ""), "prompt"),
        lambda: turns_of(body.get("messages")),
    ):
        try:
            parse()
        except ApiError as e:
            assert 400 <= e.status < 500 and json.dumps(e.body())


def test_the_fuzzers_reach_the_good_path():
    """The generators are not so wild that every input is refused: the well-formed one passes."""
    from llmkit.core.interop.hf import config_from_hf

    assert config_from_hf(GOOD_HF, "config.json")["n_layer"] == 2


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def real_gguf(trained_run, tmp_path_factory):
    need_module("gguf", "GGUF files")
    from llmkit.core.interop.export import export
    from llmkit.core.store.checkpoint import read_checkpoint

    path = tmp_path_factory.mktemp("real") / "m.gguf"
    export(read_checkpoint(trained_run), path, format="gguf", quant="f32")
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6))
def test_a_real_gguf_with_damaged_header_bytes_is_read_or_refused(real_gguf, tmp_path_factory, flips):
    """Mutations of a real file's first 4 KiB (its counts, lengths, types and names)."""
    from llmkit.core.interop.gguf_io import config_from_gguf, open_reader, read_fields

    data = bytearray(real_gguf)
    for at, byte in flips:
        data[at % len(data)] = byte
    path = tmp_path_factory.mktemp("m") / "m.gguf"
    path.write_bytes(bytes(data))
    try:
        config_from_gguf(read_fields(open_reader(path)), str(path))
    except LlmkitError:
        pass
