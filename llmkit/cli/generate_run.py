"""The rendering side of ``llmkit generate``: streaming, batches with progress, JSON, tables, REPL."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table


class GenerateView:
    """Renders what ``core.decoding.Decoder`` produces: streamed text, batches with a progress bar,
    JSON lines, probability tables, and the interactive loop."""

    def __init__(self, decoder, *, console: Console, quiet: bool):
        self.decoder, self.tok = decoder, decoder.tok
        self.console, self.quiet = console, quiet
        self.warned = False

    def _shown(self, prompt: str) -> str:
        """What precedes the output on stdout: the prompt it continues, or nothing for a response."""
        return prompt if self.decoder.continues_prompt else ""

    def _warn_truncated(self, outputs) -> None:
        if not self.warned and any(o.truncated_prompt for o in outputs):
            self.warned = True
            self.console.print(
                f"[yellow]warning:[/] a prompt is longer than the context "
                f"({self.decoder.model.cfg.context} tokens): keeping its most recent tokens",
                highlight=False,
            )

    @staticmethod
    def _write(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def run(self, prompts: list[str], *, json_out: bool, show_probs: bool) -> None:
        """Every (prompt, sample) output, in batches; streamed when there is only one."""
        total = len(self.decoder.jobs(len(prompts)))
        stream = total == 1 and not json_out
        progress = None
        if total > 1 and not self.quiet and self.console.is_terminal:
            from rich.progress import Progress

            progress = Progress(console=self.console, transient=True)
            progress.start()
            task = progress.add_task("generating", total=total)
        blank, incomplete = 0, 0
        try:
            if stream:
                self._write(0, self._shown(prompts[0]))
            for batch in self.decoder.run(prompts, on_text=self._write if stream else None, record_probs=show_probs):
                self._warn_truncated([out for _, out in batch])
                blank += sum(not out.text.strip() for _, out in batch)
                incomplete += sum(out.complete is False for _, out in batch)
                for job, out in batch:
                    self._emit(
                        prompts[job.prompt], job.sample, out, json_out=json_out, streamed=stream, show_probs=show_probs
                    )
                if progress:
                    progress.advance(task, len(batch))
        finally:
            if progress:
                progress.stop()
        if incomplete:
            from llmkit.core.decoding.structure import StructureError  # only a structured run gets here

            d = self.decoder
            raise StructureError(
                f"{'the output' if total == 1 else f'{incomplete} of {total} outputs'} ran out of tokens "
                f"(--max-new-tokens {d.cfg.max_new_tokens}) before {d.structure.structure.describe()} was "
                "complete: raise --max-new-tokens"
            )
        if blank == total and not self.quiet:
            self.console.print(
                f"[yellow]warning:[/] {'every output was' if total > 1 else 'the output is'} empty: the model ended "
                "at once (end-of-text) or wrote only blank space. It is likely undertrained for this input: train "
                "longer, check the prompt format (--raw sends it as is), or sample (--temperature 0.8).",
                highlight=False,
            )

    def _emit(self, prompt: str, sample: int, out, *, json_out: bool, streamed: bool, show_probs: bool) -> None:
        if json_out:
            row = {
                "prompt": prompt,
                "sample": sample,
                "text": out.text,
                "tokens": len(out.ids),
                "finish_reason": out.finish_reason,
                "tokens_per_s": round(out.tokens_per_s, 2),
            }
            if out.score is not None:
                row["score"] = out.score
            if out.drafted:
                row.update(drafted=out.drafted, accepted=out.accepted)
            if out.complete is not None:
                row["complete"] = out.complete
            if show_probs:
                row["probs"] = [
                    {
                        "token": self.tok.token_text(p.token),
                        "prob": p.prob,
                        "top": [[self.tok.token_text(t), q] for t, q in p.top],
                    }
                    for p in out.probs
                ]
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            if not streamed:
                sys.stdout.write(self._shown(prompt) + out.text)
            # outputs of a batch: one blank line apart (responses: one per line, like their prompts)
            sys.stdout.write("\n" if streamed or not self.decoder.continues_prompt else "\n\n")
            sys.stdout.flush()
            if show_probs:
                Console(highlight=False).print(self.probs_table(out))
        if not self.quiet and not json_out:
            guessed = (
                f", {out.accepted}/{out.drafted} guesses accepted ({out.accepted / out.drafted:.0%})"
                if out.drafted
                else ""
            )
            self.console.print(
                f"[dim]{len(out.ids)} tokens, {out.tokens_per_s:.1f} tokens/s{guessed}, "
                f"finished: {out.finish_reason}[/]",
                highlight=False,
            )

    def probs_table(self, out) -> Table:
        table = Table(title="token probabilities", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column("p", justify="right")
        table.add_column("top alternatives")

        def show(t: int) -> str:
            return escape(repr(self.tok.token_text(t))[1:-1])

        for n, step in enumerate(out.probs, 1):
            colour = "green" if step.prob >= 0.5 else "yellow" if step.prob >= 0.1 else "red"
            alts = "  ".join(f"{show(t)} {q:.2f}" for t, q in step.top if t != step.token)
            table.add_row(str(n), show(step.token), f"[{colour}]{step.prob:.3f}[/]", alts)
        return table

    def interactive(self) -> None:
        """Read a line, continue the conversation so far, stream the answer; Ctrl-D ends."""
        from llmkit.core.decoding.decoder import Conversation

        chat = Conversation(self.decoder)
        hello = (
            "interactive: type text and press Enter"
            if self.decoder.continues_prompt
            else "chat: type a message and press Enter"
        )
        for line in self._lines(hello):
            out = chat.send(line, on_text=self._write)
            self._warn_truncated([out])
            sys.stdout.write("\n")

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
