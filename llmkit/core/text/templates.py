"""Chat templates: a pretrained model's own conversation format, rendered as its authors wrote it.

A model's ``chat_template`` (Jinja, as in ``tokenizer_config.json`` or a GGUF's
``tokenizer.chat_template``) travels in the checkpoint's tokenizer contract. It is rendered in
jinja2's sandbox — a template is data from a file, and the sandbox refuses attribute tricks that
would reach Python — with the variables ``transformers`` gives it (``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``) and its ``raise_exception`` helper, so
the text is byte for byte the one ``apply_chat_template`` produces.
"""

from __future__ import annotations

import functools

from llmkit.core.errors import DataError

CHAT = "chat"
"""task.template's value for "the model's own chat template"."""


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


def render(tok, turns: list[tuple[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The conversation ``turns`` [(role, content)] as the model's chat template writes it."""
    from jinja2.exceptions import TemplateError  # optional dependency (the interop extra)

    template = tok.chat_template
    if not template:
        raise DataError("this model has no chat template: give task.template (with {prompt}) instead")
    messages = [{"role": role, "content": content} for role, content in turns]
    try:
        return _compiled(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.id_to_piece(tok.bos_id),
            eos_token=tok.id_to_piece(tok.eos_id),
        )
    except TemplateError as e:
        raise DataError(f"the model's chat template refused this conversation: {e}") from None
