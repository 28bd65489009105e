"""The decoding entry point: texts in, outputs out, with the policy every front end shares.

``steps.py`` owns the mechanics (prefill, choose, step; beam search; text streams). This module
owns the decisions around them, so the terminal command and any other front end (an HTTP server)
decide the same way:

- how a text becomes a prompt: through the checkpoint's template (instruct and translate
  checkpoints: only the response is produced), as plain text, or the beginning-of-text token;
- beam search, speculative greedy decoding (a draft model's or the text's own guesses), or
  batched decoding;
- the seeds: one base seed (given, or drawn once), and ``row_seed(base, prompt, sample)`` for every
  output, so an output never depends on its batch;
- batching (prompt, sample) jobs;
- keeping a conversation inside the context window (the oldest exchange, or the oldest text, goes
  first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llmkit.core.config import SampleConfig
from llmkit.core.decoding.speculative import DraftModel, PromptLookup, guesses_per_pass, speculative_batch
from llmkit.core.decoding.steps import Output, beam_search, decode_batch, random_seed, row_seed
from llmkit.core.decoding.structure import Structure, compile_structure
from llmkit.core.decoding.tools import Tool, instructions, reads_tools
from llmkit.core.errors import ConfigError
from llmkit.core.text.examples import encode_prompt

TextFn = Callable[[int, str], None]
"""``on_text(row, text)``: newly visible text of one row of a batch, for streaming."""


@dataclass(frozen=True)
class Prompts:
    """The prompt policy every front end shares: how a text, or a conversation's turns, become the
    token ids a model answers. With a template (an instruct or translate checkpoint's, or ``chat``
    for a pretrained chat model's own format) through it, so only the response is produced;
    without one as plain text the model continues (a conversation's turns one per line)."""

    tok: object
    template: str | None = None

    def text(self, text: str) -> list[int]:
        if self.template is not None:
            return encode_prompt(self.tok, self.template, [("user", text)])
        return self.tok.encode_text(text)

    @property
    def shows_tools(self) -> bool:
        """Whether the model's own chat template renders tools (and tool results) itself."""
        return self.template == "chat" and reads_tools(self.tok.chat_template)

    def turns(self, turns: list[tuple[str, str]], tools: list[Tool] | None = None) -> list[int]:
        """A conversation's ids; with ``tools`` the model is shown the functions it may call: by its
        chat template where that has a tool format, else in a system message (``tools.py``)."""
        if tools and not self.shows_tools:
            text = instructions(tools)
            if turns and turns[0][0] == "system":
                text, turns = f"{turns[0][1]}\n\n{text}", turns[1:]
            turns = [("system", text), *turns]
            tools = None
        if self.template is not None:
            shown = [t.as_openai() for t in tools] if tools else None
            return encode_prompt(self.tok, self.template, turns, tools=shown)
        return self.tok.encode_text("".join(f"{content}\n" for _, content in turns))

    @staticmethod
    def template_for(task, tok, *, chat: bool) -> str | None:
        """The template a checkpoint's prompts go through: the model's own chat format when
        ``chat`` is asked for and it has one, else its task's template (instruct, translate), else none."""
        if chat and getattr(tok, "chat_template", None):
            return "chat"
        return task.prompt_template if task.uses_template else None


@dataclass(frozen=True)
class Job:
    """One output to produce: sample ``sample`` of prompt ``prompt`` (indexes into the input)."""

    prompt: int
    sample: int


class Decoder:
    """Decoding settings bound to a model and its tokenizer (and template, for instruct and
    translate checkpoints)."""

    def __init__(
        self,
        model,
        tokenizer,
        cfg: SampleConfig,
        device,
        *,
        template: str | None = None,
        draft=None,
        structure: Structure | None = None,
    ):
        self.model, self.tok, self.cfg, self.device, self.template = model, tokenizer, cfg, device, template
        self.prompts = Prompts(tokenizer, template)
        self.base_seed = cfg.seed if cfg.seed is not None else random_seed()
        self.structure = None  # structured outputs: the compiled structure every output keeps to
        if structure is not None:
            if draft is not None or cfg.lookup or cfg.num_beams > 1:
                way = "--draft" if draft is not None else "--lookup" if cfg.lookup else "--num-beams"
                raise ConfigError(f"{structure.source} cannot be combined with {way}: it constrains batched decoding")
            self.structure = compile_structure(structure, tokenizer, tokenizer.eos_id)
        self.proposers = None  # speculative decoding: n -> a proposer for each of n rows
        if draft is not None or cfg.lookup:
            why = (
                "it needs greedy decoding (--temperature 0)"
                if not cfg.greedy
                else "beam search decodes its own way"
                if cfg.num_beams > 1
                else "penalties and no-repeat-ngram change the choices as the text grows"
                if cfg.uses_history
                else ""
            )
            if why:
                raise ConfigError(f"{'--draft' if draft is not None else '--lookup'} cannot be used here: {why}")
            if draft is not None and draft.cfg.vocab_size != model.cfg.vocab_size:
                raise ConfigError(
                    f"--draft: the draft model's vocabulary ({draft.cfg.vocab_size}) is not the "
                    f"model's ({model.cfg.vocab_size}): it must share the tokenizer"
                )
            if draft is not None:  # a draft model keeps a cache per text: one per row
                self.proposers = lambda n: [DraftModel(draft, device) for _ in range(n)]
            else:  # prompt lookup only reads the row's tokens
                self.proposers = lambda n: [PromptLookup(cfg.lookup)] * n

    @property
    def continues_prompt(self) -> bool:
        """Whether an output continues its prompt's text (a plain model) or stands alone (a response)."""
        return self.template is None

    def encode(self, text: str) -> list[int]:
        return self.prompts.text(text)

    def decode(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        *,
        on_text: TextFn | None = None,
        record_probs: bool = False,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Output]:
        """Outputs for token prompts: beam search one by one when asked for, else one batch."""
        if self.proposers is not None and not record_probs:  # the plain greedy output, in fewer passes
            proposers = self.proposers(len(prompts))
            return speculative_batch(
                self.model,
                prompts,
                self.cfg,
                proposers,
                eos_id=self.tok.eos_id,
                decode=self.tok.decode,
                device=self.device,
                on_text=on_text,
                draft_tokens=self.cfg.draft_tokens or guesses_per_pass(proposers[0]),
            )
        if self.cfg.num_beams > 1:
            outs = []
            for p in prompts:
                out = beam_search(
                    self.model, p, self.cfg, eos_id=self.tok.eos_id, decode=self.tok.decode, device=self.device
                )
                if on_text and out.text:
                    on_text(len(outs), out.text)
                outs.append(out)
            return outs
        return decode_batch(
            self.model,
            prompts,
            self.cfg,
            eos_id=self.tok.eos_id,
            decode=self.tok.decode,
            device=self.device,
            seeds=seeds,
            record_probs=record_probs,
            on_text=on_text,
            cancelled=cancelled,
            structure=self.structure,
        )

    def jobs(self, n_prompts: int) -> list[Job]:
        return [Job(i, s) for i in range(n_prompts) for s in range(self.cfg.num_samples)]

    def run(
        self, texts: list[str], *, on_text: TextFn | None = None, record_probs: bool = False
    ) -> Iterator[list[tuple[Job, Output]]]:
        """Every (prompt, sample) output of ``texts``, a batch at a time, in input order."""
        jobs = self.jobs(len(texts))
        for start in range(0, len(jobs), self.cfg.batch_size):
            chunk = jobs[start : start + self.cfg.batch_size]
            prompts = [self.encode(texts[j.prompt]) for j in chunk]
            seeds = [row_seed(self.base_seed, j.prompt, j.sample) for j in chunk]
            yield list(zip(chunk, self.decode(prompts, seeds, on_text=on_text, record_probs=record_probs)))


@dataclass
class Conversation:
    """An interactive session: each user line continues the conversation so far.

    With a template (an instruct checkpoint) the conversation is kept as turns, each user line
    through the template and each answer closed by EOS, as in training; without one, as plain
    text that the model continues. Either way the oldest part goes first when the context is full.
    """

    decoder: Decoder
    turns: list[tuple[str, str]] = field(default_factory=list)
    history: str = ""
    sent: int = 0
    """Lines answered so far: answer n is drawn with row_seed(base, n), like prompt n of a batch."""

    def send(self, line: str, *, on_text: TextFn | None = None) -> Output:
        d = self.decoder
        seed = [row_seed(d.base_seed, self.sent)]
        self.sent += 1
        if d.template is not None:
            self.turns.append(("user", line))
            ids = self._fit_turns()
            out = d.decode([ids], seed, on_text=on_text)[0]
            self.turns.append(("assistant", out.text))
            return out
        self.history += line + "\n"
        out = d.decode([d.encode(self.history)], seed, on_text=on_text)[0]
        self.history += out.text + "\n"
        # Keep the history within the context window: the oldest text goes first.
        self.history = d.tok.decode(d.tok.encode(self.history)[-(d.model.cfg.context - 1) :])
        return out

    def _fit_turns(self) -> list[int]:
        d = self.decoder
        ids = d.prompts.turns(self.turns)
        while len(ids) >= d.model.cfg.context and len(self.turns) > 1:
            self.turns = self.turns[2:]  # the oldest exchange goes first
            ids = d.prompts.turns(self.turns)
        return ids
