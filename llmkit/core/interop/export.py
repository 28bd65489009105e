"""Export: an llmkit checkpoint as a Hugging Face folder or a GGUF file, with a model card."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from llmkit.core.atomic import atomic_dir, atomic_path
from llmkit.core.errors import ConfigError
from llmkit.core.interop import gguf_io, hf
from llmkit.core.interop.families import family_of_model


def model_card(ckpt) -> str:
    """README.md of an exported model: what it is, how it was made, how it scored."""
    m, st, task = ckpt.model_cfg, ckpt.state, ckpt.task
    architecture = family_of_model(ckpt.config["model"]).architecture
    lines = [
        f"# {ckpt.path.parent.name if ckpt.path.name in ('best', 'last') else ckpt.path.name}",
        "",
        f"A decoder-only language model ({architecture}) written by `llmkit export`.",
        "",
        "## Model",
        "",
        f"- {m.n_layer} layers, width {m.d_model}, {m.n_head} attention heads ({m.kv_heads} key/value heads), "
        f"{m.mlp} MLP width {m.ff_dim}, context {m.context} tokens, vocabulary {m.vocab_size}",
        f"- task: {task.kind}" + (f" (template `{task.template}`)" if task.template else ""),
        "",
    ]
    source = st.get("imported_from")
    lines += ["## How it was made", ""]
    if source:
        lines.append(f"- imported from `{Path(source).name}` ({st.get('source_format')})")
    if task.init_from:
        lines.append(f"- fine-tuned from `{task.init_from}`")
    if st.get("step"):
        lines.append(
            f"- {st['step']} optimizer steps, {st.get('tokens_seen', 0):,} training tokens, "
            f"precision {st.get('precision', '?')}, seed {st.get('seed', '?')}"
        )
    opt = ckpt.config.get("optim", {})
    if opt and st.get("step"):
        lines.append(
            f"- AdamW, peak learning rate {opt.get('lr')}, warmup {opt.get('warmup_steps')} steps, "
            f"weight decay {opt.get('weight_decay')}"
        )
    lines.append("")
    if st.get("best_val_loss") is not None or st.get("best_score") is not None:
        lines += ["## Validation", ""]
        if st.get("best_val_loss") is not None:
            lines.append(f"- best validation loss {st['best_val_loss']:.4f} (step {st.get('best_step')})")
        if st.get("best_score") is not None and task.best_metric != "val_loss":
            lines.append(f"- best {task.best_metric} {st['best_score']:.4f}")
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("this-folder")',
        'model = AutoModelForCausalLM.from_pretrained("this-folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


def export(ckpt, out: Path, *, format: str, quant: str = "f16") -> Path:
    out = Path(out)
    if format == "hf":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {out} exists and is not an empty folder: choose a new one")
        with _written(out), atomic_dir(out) as tmp:
            hf.export_folder(ckpt, tmp, card=model_card(ckpt))
        return out
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"--out {out}: a GGUF file name ends in .gguf")
    if out.exists():
        raise ConfigError(f"--out {out} already exists")
    with _written(out), atomic_path(out) as tmp:
        gguf_io.export_file(ckpt, tmp, quant=quant)
    return out


@contextlib.contextmanager
def _written(out: Path) -> Iterator[None]:
    """A full disk or a read-only folder is one line; the export leaves nothing at ``out``."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}; nothing was written there") from None
