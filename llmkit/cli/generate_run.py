"""The rendering side of ``llmkit generate``: streaming, batches with progress, JSON, tables, REPL."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table


class Session:
    """Decoding for the CLI. With a ``template`` (instruct/translate checkpoints) each prompt is
    wrapped in it and only the response is printed."""

    def __init__(self, model, tokenizer, cfg, device, *, console: Console, quiet: bool, template: str | None = None):
        self.model, self.tok, self.cfg, self.device = model, tokenizer, cfg, device
        self.console, self.quiet, self.template = console, quiet, template
        self.warned = False

    def _encode(self, text: str) -> list[int]:
        if self.template is not None:
            from llmkit.core.task_data import encode_prompt

            return encode_prompt(self.tok, self.template, [("user", text)])
        return self.tok.encode(text) if text else [self.tok.bos_id]

    def _shown(self, prompt: str) -> str:
        """What precedes the output on stdout: the prompt it continues, or nothing for a response."""
        return "" if self.template is not None else prompt

    def _warn_truncated(self, outputs) -> None:
        if not self.warned and any(o.truncated_prompt for o in outputs):
            self.warned = True
            self.console.print(f"[yellow]warning:[/] a prompt is longer than the context ({self.model.cfg.context} "
                               "tokens): keeping its most recent tokens", highlight=False)

    def _decode(self, prompts: list[list[int]], seeds: list[int], *, on_text=None, record=False):
        from llmkit.core.generate import beam_search, decode_batch

        if self.cfg.num_beams > 1:
            outs = []
            for p in prompts:
                out = beam_search(self.model, p, self.cfg, eos_id=self.tok.eos_id, decode=self.tok.decode,
                                  device=self.device)
                if on_text:
                    on_text(0, out.text)
                outs.append(out)
            return outs
        return decode_batch(self.model, prompts, self.cfg, eos_id=self.tok.eos_id, decode=self.tok.decode,
                            device=self.device, seeds=seeds, record_probs=record, on_text=on_text)

    def run(self, prompts: list[str], *, json_out: bool, show_probs: bool) -> None:
        """Decode every (prompt, sample) pair in batches; stream when there is only one."""
        jobs = [(i, s) for i, _ in enumerate(prompts) for s in range(self.cfg.num_samples)]
        base = self.cfg.seed if self.cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
        stream = len(jobs) == 1 and not json_out
        progress = None
        if len(jobs) > 1 and not self.quiet and self.console.is_terminal:
            from rich.progress import Progress

            progress = Progress(console=self.console, transient=True)
            progress.start()
            task = progress.add_task("generating", total=len(jobs))
        try:
            for start in range(0, len(jobs), self.cfg.batch_size):
                chunk = jobs[start: start + self.cfg.batch_size]
                ids = [self._encode(prompts[i]) for i, _ in chunk]
                # A row's seed depends only on its prompt and sample index: batching never changes it.
                seeds = [base + 1_000_003 * i + s for i, s in chunk]
                if stream:
                    sys.stdout.write(self._shown(prompts[chunk[0][0]]))
                    sys.stdout.flush()
                on_text = (lambda _b, text: (sys.stdout.write(text), sys.stdout.flush())) if stream else None
                outs = self._decode(ids, seeds, on_text=on_text, record=show_probs)
                self._warn_truncated(outs)
                for (i, s), out in zip(chunk, outs):
                    self._emit(prompts[i], s, out, json_out=json_out, streamed=stream, show_probs=show_probs)
                if progress:
                    progress.advance(task, len(chunk))
        finally:
            if progress:
                progress.stop()

    def _emit(self, prompt: str, sample: int, out, *, json_out: bool, streamed: bool, show_probs: bool) -> None:
        if json_out:
            row = {"prompt": prompt, "sample": sample, "text": out.text, "tokens": len(out.ids),
                   "finish_reason": out.finish_reason, "tokens_per_s": round(out.tokens_per_s, 2)}
            if out.score is not None:
                row["score"] = out.score
            if show_probs:
                row["probs"] = [{"token": self.tok.decode([p.token]), "prob": p.prob,
                                 "top": [[self.tok.decode([t]), q] for t, q in p.top]} for p in out.probs]
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            if not streamed:
                sys.stdout.write(self._shown(prompt) + out.text)
            # outputs of a batch: one blank line apart (responses: one per line, like their prompts)
            sys.stdout.write("\n" if streamed or self.template is not None else "\n\n")
            sys.stdout.flush()
            if show_probs:
                Console(highlight=False).print(self.probs_table(out))
        if not self.quiet and not json_out:
            self.console.print(f"[dim]{len(out.ids)} tokens, {out.tokens_per_s:.1f} tokens/s, "
                               f"finished: {out.finish_reason}[/]", highlight=False)

    def probs_table(self, out) -> Table:
        table = Table(title="token probabilities", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column("p", justify="right")
        table.add_column("top alternatives")

        def show(t: int) -> str:
            return escape(repr(self.tok.decode([t]))[1:-1] or self.tok.id_to_piece(t))

        for n, step in enumerate(out.probs, 1):
            colour = "green" if step.prob >= 0.5 else "yellow" if step.prob >= 0.1 else "red"
            alts = "  ".join(f"{show(t)} {q:.2f}" for t, q in step.top if t != step.token)
            table.add_row(str(n), show(step.token), f"[{colour}]{step.prob:.3f}[/]", alts)
        return table

    def interactive(self) -> None:
        """Read a line, continue the conversation so far, stream the answer; Ctrl-D ends.

        With a template (an instruct checkpoint) the conversation is kept as turns, each user line
        through the template and each answer closed by EOS, as in training."""
        if self.template is not None:
            return self._chat()
        history = ""
        for line in self._lines("interactive: type text and press Enter"):
            history += line + "\n"
            ids = self._encode(history)
            outs = self._decode([ids], [self.cfg.seed or 0],
                                on_text=lambda _b, text: (sys.stdout.write(text), sys.stdout.flush()))
            self._warn_truncated(outs)
            history += outs[0].text + "\n"
            sys.stdout.write("\n")
            # Keep the history within the context window: the oldest text goes first.
            keep = self.tok.encode(history)[-(self.model.cfg.context - 1):]
            history = self.tok.decode(keep)

    def _lines(self, hello: str):
        """The user's non-blank lines until Ctrl-D."""
        self.console.print(f"[bold]llmkit[/] {hello}; Ctrl-D to quit.", highlight=False)
        while True:
            try:
                line = input("> ")
            except EOFError:
                self.console.print("")
                return
            if line.strip():
                yield line

    def _chat(self) -> None:
        from llmkit.core.task_data import encode_prompt

        turns: list[tuple[str, str]] = []
        for line in self._lines("chat: type a message and press Enter"):
            turns.append(("user", line))
            ids = encode_prompt(self.tok, self.template, turns)
            while len(ids) >= self.model.cfg.context and len(turns) > 1:
                turns = turns[2:]  # the oldest exchange goes first
                ids = encode_prompt(self.tok, self.template, turns)
            outs = self._decode([ids], [self.cfg.seed or 0],
                                on_text=lambda _b, text: (sys.stdout.write(text), sys.stdout.flush()))
            self._warn_truncated(outs)
            turns.append(("assistant", outs[0].text))
            sys.stdout.write("\n")
