"""Chat templates: a pretrained model's own conversation format, rendered as its authors wrote it.

A model's ``chat_template`` (Jinja, as in ``tokenizer_config.json`` or a GGUF's
``tokenizer.chat_template``) travels in the checkpoint's tokenizer contract. It is rendered in
jinja2's sandbox — a template is data from a file, and the sandbox refuses attribute tricks that
would reach Python — with the variables ``transformers`` gives it (``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``) and its ``raise_exception`` helper, so
the text is byte for byte the one ``apply_chat_template`` produces. A template renders under a
time and a size limit (``RENDER_SECONDS``, ``RENDER_CHARS``): a loop that never ends, a recursion
or a division by zero is one line, never a frozen server or a traceback.
"""

from __future__ import annotations

import functools
import sys
import time

from llmkit.core.errors import DataError

CHAT = "chat"
"""task.template's value for "the model's own chat template"."""


def chat_instruction(template: str) -> str | None:
    """For a template in the model's chat format, the text each user turn goes through first:
    ``chat`` alone gives ``{prompt}`` (the turn as it is), ``chat:Translate into English.\n\n{prompt}``
    puts the instruction in the template rather than in every row of the data. None for a plain
    template."""
    if template == CHAT:
        return "{prompt}"
    if template.startswith(CHAT + ":"):
        return template[len(CHAT) + 1 :]
    return None


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.exceptions import TemplateError  # optional dependency (the interop extra)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # optional dependency (the interop extra)

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise DataError(f"the model's chat template does not compile: {e}") from None


def render(tok, turns: list[tuple[str, str]], *, add_generation_prompt: bool = True, tools: list | None = None) -> str:
    """The conversation ``turns`` [(role, content)] as the model's chat template writes it (with
    ``tools``, OpenAI's function list, for a template that has a tool format)."""
    from jinja2.exceptions import TemplateError  # optional dependency (the interop extra)

    template = tok.chat_template
    if not template:
        raise DataError("this model has no chat template: give task.template (with {prompt}) instead")
    messages = [{"role": role, "content": content} for role, content in turns]
    compiled = _compiled(template)
    variables = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                     bos_token=tok.id_to_piece(tok.bos_id), eos_token=tok.id_to_piece(tok.eos_id))  # fmt: skip
    if tools:
        variables["tools"] = tools
    try:
        return _bounded(lambda: compiled.generate(**variables))
    except TemplateError as e:
        raise DataError(f"the model's chat template refused this conversation: {e}") from None
    except RecursionError:
        raise DataError("the model's chat template recurses without end: refused") from None
    except ArithmeticError as e:
        raise DataError(f"the model's chat template fails on this conversation ({type(e).__name__}: {e})") from None


RENDER_SECONDS = 2.0
"""The longest a chat template may take to render one conversation (a real one takes milliseconds)."""
RENDER_CHARS = 16 << 20
"""The longest prompt a chat template may write (16M characters: millions of tokens)."""


class TemplateTooCostly(Exception):
    """Raised inside a template's rendering when it passes the time limit."""


def _bounded(chunks_of) -> str:
    """Join a template's output pieces, stopping it past ``RENDER_SECONDS`` or ``RENDER_CHARS``.

    The sandbox keeps a template away from Python's internals, not from loops: nested loops over
    ``range(100000)`` froze a server (its health check, its SIGTERM). A trace function counts the
    template's lines as they run and stops it at the deadline, whether it writes or not; the
    output is counted piece by piece. Tracing slows rendering down, harmless at milliseconds."""
    deadline = time.monotonic() + RENDER_SECONDS
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        lines += 1
        if lines % 1024 == 0 and time.monotonic() > deadline:
            raise TemplateTooCostly
        return tracer

    parts, size = [], 0
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        for piece in chunks_of():
            size += len(piece)
            if size > RENDER_CHARS:
                raise DataError(f"the model's chat template writes over {RENDER_CHARS} characters: refused")
            parts.append(piece)
    except TemplateTooCostly:
        raise DataError(f"the model's chat template takes over {RENDER_SECONDS:g} s to render: refused") from None
    finally:
        sys.settrace(previous)
    return "".join(parts)
