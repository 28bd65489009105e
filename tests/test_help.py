"""Every command's --help shows every default, and no short flag means two things."""

from __future__ import annotations

from typer.main import get_command

from llmkit.cli.app import app

# Options that are absent unless given: nothing is used in their place, so there is no default to show.
ABSENT_UNLESS_GIVEN = {
    "--mix",
    "--val",
    "--config",
    "--set",
    "--tokenizer",
    "--init",
    "--resume",
    "--prompt",
    "--prompt-file",
    "--stop",
    "--choices",
    "--regex",
    "--json-schema",
    "--draft",
    "--quantize",
    "--query",
    "--index",
    "--input",
    "--column",
    "--template",
    "--data",
    "--file",
    "--text",
    "--layer",
    "--head",
    "--embeddings",
    "--labels",
    "--user-symbols",
    "--global-batch-size",
    "--tokens",
    "--time",
    "--task",
    "encode --out",
}


def _commands(cmd, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def _options():
    for name, cmd in _commands(get_command(app)):
        for p in cmd.params:
            if type(p).__name__ in ("TyperOption", "Option") and p.name != "help":
                yield name, p


def test_every_option_shows_its_default():
    unshown = []
    for name, p in _options():
        flag = next(o for o in p.opts if o.startswith("--"))
        if (p.is_flag and not p.default) or p.required or {flag, f"{name} {flag}"} & ABSENT_UNLESS_GIVEN:
            continue  # an off switch, a required option, or an option nothing replaces
        shown = p.show_default not in (False, None) and p.default is not None
        if not shown and "default" not in (p.help or "").lower():
            unshown.append(f"llmkit {name} {flag}")
    assert not unshown, "--help shows no default for:\n" + "\n".join(unshown)


def test_no_short_flag_means_two_things():
    meaning: dict[str, set[str]] = {}
    for _, p in _options():
        long = next(o for o in p.opts if o.startswith("--"))
        for short in (o for o in [*p.opts, *p.secondary_opts] if len(o) == 2):
            meaning.setdefault(short, set()).add(long)
    assert {k: v for k, v in meaning.items() if len(v) > 1} == {}


def test_usage_and_help_name_values_not_python_types():
    from typer.testing import CliRunner

    for name, _ in _commands(get_command(app)):
        out = CliRunner().invoke(app, [*name.split(), "--help"], env={"COLUMNS": "200"}).output
        usage = out.split("\n\n", 1)[0]
        options = out.split("Options:", 1)[-1]
        # (typer itself tags each *argument* with its type, <str>, <Path>, <list[str]>: not ours to change)
        assert "list[" not in usage and "...]..." not in usage, f"llmkit {name}: {usage}"
        assert "list[" not in options, f"llmkit {name} --help:\n{options}"
