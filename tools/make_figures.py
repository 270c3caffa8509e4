"""Draw the documentation's pictures into docs/images/ (matplotlib, the plot extra), byte for byte the same on every
run: SVG with its text kept as text, no date or creator in its metadata, and a fixed salt for its element ids.

    model.svg             Llama 3.1 8B's data flow, each step with its tensor's shape (microllama.checkpoint.family)
    rope_wavelengths.svg  the wavelength of each RoPE frequency before and after Llama 3.1's scaling, its three bands
    packed_mask.svg       the attention mask of a packed row of 3 documents (microllama.model.causal_mask)
    loss_curve.svg        the loss-curve golden, goldens/losses/tiny-fp32-cpu-ws1.json

    python tools/make_figures.py [--out docs/images]
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from microllama import flags  # noqa: E402
from microllama.args import ffn_hidden_dim  # noqa: E402
from microllama.checkpoint.family import model_args  # noqa: E402
from microllama.golden.loss_curve import read_golden  # noqa: E402
from microllama.golden.tutorial import DEFAULT_CURVE  # noqa: E402
from microllama.model import apply_scaling, causal_mask  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
STYLE = {"svg.hashsalt": "microllama", "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False}  # fmt: skip
METADATA = {"Date": None, "Creator": None}  # no date, no matplotlib version: the same bytes on every run
# The matplotlib that drew the committed files (set it when you redraw them): another version may lay out the same
# picture in other bytes, and tests/test_figures.py then compares their labels only.
DRAWN_WITH = "3.11.2"
DOCUMENTS = (5, 7, 4)  # packed_mask.svg: the lengths of the 3 documents in its row


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, format="svg", metadata=METADATA, bbox_inches="tight")
    plt.close(fig)
    return path


def model_figure(path: Path, name: str = "llama3.1-8b") -> Path:
    """Boxes and arrows from token ids to logits, with the shapes of a batch of (b, s) tokens."""
    a = model_args(name)
    hidden = ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier)
    hd, d, v = a.head_dim, a.dim, a.vocab_size
    # (text, shape after it, x, y): the main path down the left, one block's inside on the right.
    main = [
        ("token ids", "(b, s)"),
        ("tok_embeddings", f"(b, s, {d})"),
        (f"{a.n_layers} x TransformerBlock", f"(b, s, {d})"),
        ("norm (RMSNorm)", f"(b, s, {d})"),
        (f"output ({d} -> {v:,})", f"logits (b, s, {v:,})"),
    ]
    block = [
        ("attention_norm (RMSNorm)", f"(b, s, {d})"),
        (
            f"wq, wk, wv -> {a.n_heads} q heads, {a.n_kv_heads} kv heads",
            f"q (b, s, {a.n_heads}, {hd}); k, v (b, s, {a.n_kv_heads}, {hd})",
        ),  # fmt: skip
        ("RoPE on q and k (scaled frequencies)", "same shapes"),
        (f"KV cache; repeat k, v {a.n_heads // a.n_kv_heads}x (grouped-query)", f"k, v (b, s, {a.n_heads}, {hd})"),
        (f"softmax(q k^T / sqrt({hd}) + mask) v", f"(b, {a.n_heads}, s, {hd})"),
        (f"wo ({a.n_heads} x {hd} -> {d})", f"(b, s, {d})"),
        ("+ residual", f"h (b, s, {d})"),
        ("ffn_norm (RMSNorm)", f"(b, s, {d})"),
        (f"silu(w1 x) * w3 x  ({d} -> {hidden:,})", f"(b, s, {hidden:,})"),
        (f"w2 ({hidden:,} -> {d})", f"(b, s, {d})"),
        ("+ residual", f"(b, s, {d})"),
    ]
    fig, ax = plt.subplots(figsize=(9.2, 7.4))
    ax.set(xlim=(0, 10), ylim=(0, 12.4))
    ax.axis("off")

    def box(x: float, y: float, w: float, text: str, shape: str, color: str) -> None:
        ax.add_patch(FancyBboxPatch((x - w / 2, y - 0.3), w, 0.6, boxstyle="round,pad=0.04", fc=color, ec="0.3"))
        ax.text(x, y + 0.09, text, ha="center", va="center", fontsize=8.5)
        ax.text(x, y - 0.18, shape, ha="center", va="center", fontsize=7, color="0.25")

    def arrow(x0: float, y0: float, x1: float, y1: float, color: str = "0.3", **kw: object) -> None:
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=9, color=color, **kw))

    ys = [11.2 - 2.55 * i for i in range(len(main))]
    for i, (text, shape) in enumerate(main):
        box(1.8, ys[i], 3.2, text, shape, "#dbe8f5" if "Block" not in text else "#f8e3c4")
        if i:
            arrow(1.8, ys[i - 1] - 0.32, 1.8, ys[i] + 0.32)
    by = [11.8 - 1.06 * i for i in range(len(block))]
    for i, (text, shape) in enumerate(block):
        box(6.9, by[i], 5.6, text, shape, "#f8e3c4" if "residual" not in text else "#e4f0dc")
        if i:
            arrow(6.9, by[i - 1] - 0.32, 6.9, by[i] + 0.32)
    ax.add_patch(FancyBboxPatch((3.95, by[-1] - 0.5), 5.95, by[0] - by[-1] + 1.0, boxstyle="round,pad=0.05",
                                fc="none", ec="#c98a2b", ls="--"))  # fmt: skip
    ax.text(9.9, by[-1] - 0.62, "one TransformerBlock (pre-norm, residual)", ha="right", va="top", fontsize=8,
            color="#8a5a12")  # fmt: skip
    arrow(3.45, ys[2], 3.95, ys[2], ls=":")
    for top, plus in ((0, 6), (6, 10)):  # the residual paths: a block's input, then h, added back in
        arrow(9.7, by[top] + 0.12, 9.7, by[plus], connectionstyle="bar,fraction=-0.035", color="#3d6b22")
    ax.set_title(f"Llama 3.1 8B ({name}): dim {d}, {a.n_layers} layers, head_dim {hd}, vocabulary {v:,}; "
                 "b sequences of s tokens", fontsize=9.5)  # fmt: skip
    return _save(fig, path)


def rope_figure(path: Path, name: str = "llama3.1-8b") -> Path:
    """Each RoPE frequency's wavelength (2 pi / freq, in positions) before and after Llama 3.1's scaling."""
    a = model_args(name)
    s = a.rope_scaling
    freqs = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2).float() / a.head_dim))
    before, after = (2 * math.pi / f for f in (freqs, apply_scaling(freqs, s)))
    high, low = s.original_context / s.high_freq_factor, s.original_context / s.low_freq_factor
    fig, ax = plt.subplots(figsize=(7, 3.8))
    pairs = range(len(freqs))
    ax.axhspan(0.1, high, color="#e4f0dc", lw=0)
    ax.axhspan(high, low, color="#f8e3c4", lw=0)
    ax.axhspan(low, 1e12, color="#dbe8f5", lw=0)
    ax.plot(pairs, before.tolist(), "o", ms=3, color="0.55", label="before scaling (rope_theta 500,000)")
    ax.plot(pairs, after.tolist(), "o", ms=3, color="#c0392b", label=f"after Llama 3.1's scaling (factor {s.factor:g})")
    cuts = [
        (high, f"high-frequency cut-off: {s.original_context:,} / {s.high_freq_factor:g} = {high:,.0f}"),
        (low, f"low-frequency cut-off: {s.original_context:,} / {s.low_freq_factor:g} = {low:,.0f}"),
    ]
    for y, what in cuts:
        ax.axhline(y, color="0.3", lw=0.8, ls="--")
        ax.text(0.5, y * 1.25, what, fontsize=7.5, color="0.2")
    ax.text(63, 12, "kept", ha="right", fontsize=8, color="#3d6b22")
    ax.text(63, 3000, "between: interpolated", ha="right", va="center", fontsize=8, color="#8a5a12")
    ax.text(63, 3e8, f"long: divided by {s.factor:g}", ha="right", fontsize=8, color="#24508a")
    ax.set(yscale="log", ylim=(1, 1e10), xlim=(-1, len(freqs)), xlabel=f"pair k of head_dim {a.head_dim}",
           ylabel="wavelength (positions)", title=f"RoPE wavelengths of {name}, before and after scaling")  # fmt: skip
    ax.legend(loc="upper left", fontsize=7.5, frameon=False)
    return _save(fig, path)


def packed_mask_figure(path: Path, lengths: tuple[int, ...] = DOCUMENTS) -> Path:
    """Which keys each query may attend to in one packed row of documents: causal inside each, nothing across."""
    documents = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    n = documents.shape[1]
    mask, _ = causal_mask(n, 0, False, torch.zeros(1), documents)
    seen = (mask[0, 0] == 0).float().numpy()
    fig, ax = plt.subplots(figsize=(4.6, 4.3))
    ax.imshow(seen, cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
    starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    for s in starts[1:-1]:
        ax.axhline(s - 0.5, color="#c0392b", lw=1)
        ax.axvline(s - 0.5, color="#c0392b", lw=1)
    ticks = [f"d{d}:{p}" for d, length in enumerate(lengths) for p in range(length)]
    ax.set_xticks(range(n), ticks, rotation=90, fontsize=6.5)
    ax.set_yticks(range(n), ticks, fontsize=6.5)
    ax.set(xlabel="key (document: its position)", ylabel="query",
           title=f"a packed row of {len(lengths)} documents ({', '.join(map(str, lengths))} tokens):\n"
                 "block-causal attention, positions restart per document")  # fmt: skip
    ax.spines[["top", "right"]].set_visible(True)
    return _save(fig, path)


def loss_curve_figure(path: Path, curve: Path = DEFAULT_CURVE) -> Path:
    """The loss-curve golden's per-step training loss and gradient norm."""
    golden = read_golden(curve)
    steps = [s.step for s in golden.steps]
    r = golden.recipe
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, [s.loss for s in golden.steps], "o-", ms=3, color="C0", label="training loss")
    ax.set(xlabel="step", ylabel="loss (nats per token)", xticks=[1, *range(5, steps[-1] + 1, 5)])
    norms = ax.twinx()
    norms.plot(steps, [s.grad_norm for s in golden.steps], "s--", ms=2.5, color="0.55", label="gradient norm")
    norms.set_ylabel("gradient norm (before clipping to 1)")
    norms.spines["right"].set_visible(True)
    ax.set_title(f"{curve.name}: {r['ckpt_dir']}, {r['dtype']}, {r['batch_size']} rows of {r['max_seq_len']} "
                 f"tokens, lr {r['lr']:g}", fontsize=8.5)  # fmt: skip
    fig.legend(loc="upper right", bbox_to_anchor=(0.86, 0.86), fontsize=7.5, frameon=False)
    return _save(fig, path)


FIGURES = {"model.svg": model_figure, "rope_wavelengths.svg": rope_figure, "packed_mask.svg": packed_mask_figure,
           "loss_curve.svg": loss_curve_figure}  # fmt: skip


def main(out: str = str(IMAGES)) -> None:
    """Write every figure into out."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with plt.style.context("default"), plt.rc_context(STYLE):  # matplotlib's defaults, whatever was set before
        for name, draw in FIGURES.items():
            path = draw(folder / name)
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    flags.run(main)
