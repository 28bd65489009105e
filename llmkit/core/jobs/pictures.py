"""Pictures of what ``core/jobs/introspect.py`` measures, drawn with matplotlib (PNG or SVG).

matplotlib is an extra (``pip install 'llmkit[inspect]'``), imported here only, with its
non-interactive backend: nothing opens a window. Long texts stay readable: token labels are shown
while they fit and thinned out past that, and figures grow with the number of tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmkit.core.errors import ConfigError

MAX_LABELS = 64


def _plt():
    try:
        import matplotlib  # optional dependency (the inspect extra)
    except ImportError:
        raise ConfigError("pictures need matplotlib: pip install 'llmkit[inspect]' (or use --json)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency (the inspect extra)

    plt.rcParams.update({"font.size": 9, "svg.fonttype": "none"})
    return plt


def _shown(piece: str) -> str:
    """A piece as a label: whitespace made visible, control characters escaped (no font has them)."""
    if piece.strip() == "":
        piece = piece.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")
    return "".join(c if c.isprintable() or c in "⏎⇥" else f"\\x{ord(c):02x}" for c in piece)


def _ticks(ax, pieces: list[str], axis: str) -> None:
    n = len(pieces)
    step = max(1, -(-n // MAX_LABELS))
    where = list(range(0, n, step))
    labels = [_shown(pieces[i]) for i in where]
    if axis in ("x", "both"):
        ax.set_xticks(where, labels, rotation=90)
    if axis in ("y", "both"):
        ax.set_yticks(where, labels)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt  # optional dependency (the inspect extra)

    plt.close(fig)
    return path


def _flow(ax, pieces: list[str], colours, width: float = 100.0) -> None:
    """Pieces laid out as running text, each in its own coloured box (wrapping at ``width``)."""
    x, y = 0.0, 0.0
    for piece, colour in zip(pieces, colours):
        w = max(len(piece), 1) * 1.0 + 0.6
        if x + w > width or piece == "\n":
            x, y = 0.0, y - 2.0
        if piece == "\n":
            continue
        ax.text(
            x,
            y,
            _shown(piece),
            family="DejaVu Sans Mono",
            bbox={"boxstyle": "round,pad=0.2", "fc": colour, "ec": "none"},
            va="top",
        )
        x += w
    ax.set_xlim(-1, width + 1)
    ax.set_ylim(y - 2, 1.5)
    ax.axis("off")


def tokens(t, path: Path) -> Path:
    plt = _plt()
    palette = ["#dbe9f6", "#fde0c5", "#d9f0d3", "#f2dcf2", "#fff3b0"]
    colours = ["#f4a3a3" if b else palette[i % len(palette)] for i, b in enumerate(t.byte_fallback)]
    lines = max(1, sum(len(p) + 1 for p in t.pieces) // 100 + 1)
    fig, ax = plt.subplots(figsize=(11, 0.45 * lines + 0.8))
    _flow(ax, t.pieces, colours)
    ax.set_title(
        f"{len(t.ids)} tokens, {t.chars_per_token:.2f} characters per token"
        + (f", {sum(t.byte_fallback)} byte-fallback (red)" if any(t.byte_fallback) else ""),
        loc="left",
    )
    return _save(fig, path)


def attention(att, path: Path, layer: int | None = None, head: int | None = None) -> Path:
    plt = _plt()
    L, H, T, _ = att.weights.shape
    size = min(12, 3 + T * 0.12)
    if layer is not None and head is not None:
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(att.weights[layer, head], cmap="Blues", vmin=0, vmax=1)
        _ticks(ax, att.pieces, "both")
        ax.set_title(
            f"layer {layer}, head {head}: distance {att.distance[layer, head]:.2f}, "
            f"entropy {att.entropy[layer, head]:.2f} bits (rows: the attending token)",
            loc="left",
        )
        return _save(fig, path)
    layers = [layer] if layer is not None else list(range(L))
    fig, axes = plt.subplots(len(layers), H, figsize=(2.2 * H + 1, 2.2 * len(layers) + 0.6), squeeze=False)
    for r, lay in enumerate(layers):
        for h in range(H):
            ax = axes[r][h]
            ax.imshow(att.weights[lay, h], cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"L{lay} H{h}  d={att.distance[lay, h]:.1f}", fontsize=8)
    fig.suptitle("attention of each head (rows attend to columns; d: mean distance in tokens)", x=0.01, ha="left")
    return _save(fig, path)


def surprise(s, path: Path) -> Path:
    plt = _plt()
    from matplotlib import cm, colors  # optional dependency (the inspect extra)

    norm = colors.Normalize(vmin=0, vmax=max(8.0, max(s.bits)))
    cmap = cm.get_cmap("YlOrRd") if hasattr(cm, "get_cmap") else plt.get_cmap("YlOrRd")
    shades = ["#eeeeee"] + [colors.to_hex(cmap(norm(b))) for b in s.bits]
    lines = max(1, sum(len(p) + 1 for p in s.pieces) // 100 + 1)
    fig, ax = plt.subplots(figsize=(11, 0.45 * lines + 1.2))
    _flow(ax, s.pieces, shades)
    ax.set_title(f"surprisal of each token (bits; mean {np.mean(s.bits):.2f}): darker is more surprising", loc="left")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
    return _save(fig, path)


def logit_lens(lens, path: Path) -> Path:
    plt = _plt()
    n_layers, T = lens.prob.shape
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.55 * T), 0.45 * n_layers + 2))
    ax.imshow(lens.prob, cmap="Greens", vmin=0, vmax=1, aspect="auto", origin="lower")
    if T <= 40:
        for layer in range(n_layers):
            for i in range(T):
                ax.text(i, layer, _shown(lens.predicted[layer][i])[:8], ha="center", va="center", fontsize=7)
    _ticks(ax, lens.pieces, "x")
    ax.set_yticks(range(n_layers), ["embed"] + [f"layer {i}" for i in range(1, n_layers)])
    ax.set_title(
        "logit lens: the next token each layer would predict at each position (shade: its probability)", loc="left"
    )
    return _save(fig, path)


def embedding_map(m, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    if m.labels:
        names = sorted(set(m.labels))
        for k, name in enumerate(names):
            idx = [i for i, lab in enumerate(m.labels) if lab == name]
            ax.scatter(m.points[idx, 0], m.points[idx, 1], s=14, label=name[:40], color=plt.cm.tab10(k % 10))
        if len(names) <= 20:
            ax.legend(fontsize=8, loc="best")
    else:
        ax.scatter(m.points[:, 0], m.points[:, 1], s=14)
    title = (
        f"PCA of {len(m.points)} vectors ({m.explained[0]:.0%} + {m.explained[1]:.0%} of the variance)"
        if any(m.explained)
        else f"UMAP of {len(m.points)} vectors"
    )
    if m.neighbour_agreement is not None:
        title += f"; nearest neighbour shares the label: {m.neighbour_agreement:.0%}"
    ax.set_title(title, loc="left", fontsize=9)
    return _save(fig, path)


def loss_curve(
    path: Path,
    train: list[tuple[int, float]],
    val: list[tuple[int, float]],
    title: str,
    ylabel: str = "loss (nats/token)",
) -> Path:
    """A run's loss.svg: training loss (thin) and validation loss (points) against steps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    finite = [(s, v) for s, v in train if np.isfinite(v)]
    if finite:
        ax.plot(*zip(*finite), lw=1.2, color="#7aa6d6", label="train loss")
    finite = [(s, v) for s, v in val if np.isfinite(v)]
    if finite:
        ax.plot(*zip(*finite), lw=2, color="#d1495b", marker="o", markersize=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    return _save(fig, Path(path))
