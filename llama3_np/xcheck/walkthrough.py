"""One forward pass of a prompt as a self-contained HTML page that follows the data path.

The page walks the stages in the order of model.py: tokens, configuration, embedding and RMSNorm,
RoPE, attention (heat maps of chosen layers and heads, grouped-query sharing), SwiGLU, the
residual stream, the final norm and the logits with a logit lens. Each step shows its equation,
the source of the llama3_np function that computes it (read with `inspect.getsource` when the page
is built, so the page cannot drift from the specification), the shapes in model.py's legend with
the actual numbers, and pictures.

The numbers come from the named stages `forward` records (`trace_patterns` says which); the page
computes only what no stage holds, with the specification's own functions: the rope frequencies
with and without scaling (`rope_frequencies`), the attention scores (`causal_mask`), the gate of
SwiGLU (`linear`) and the logit lens (`rmsnorm`, `linear`, `softmax`).

Pictures are drawn with matplotlib, an optional extra (`pip install 'llama3_np[viz]'`), and
embedded as base64 PNG: the page needs no network, script, font or style sheet from elsewhere.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import inspect
import io
import math
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np

from .. import __version__, model
from ..config import ModelConfig
from ..errors import Llama3Error
from ..linear import as_float32, linear
from ..model import causal_mask, rmsnorm, rope_cos_sin, rope_frequencies, softmax
from ..stages import LAYER_STAGES, symbols

VIZ_EXTRA = "pip install 'llama3_np[viz]'"
# How many next-token candidates and logit-lens guesses the page lists.
TOP_K = 10
LENS_K = 3
# Token labels (7-point type) an axis holds per inch; past that, every n-th token is labelled.
LABELS_PER_INCH = 7
# A per-token table longer than this starts folded (a click opens it).
OPEN_ROWS = 12


def load_matplotlib():
    """matplotlib's object-oriented API (no pyplot: no global figure state, no GUI backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.image import imsave
    except ImportError:
        raise Llama3Error(f"the walkthrough draws its pictures with matplotlib, which is not installed: "
                          f"{VIZ_EXTRA}") from None
    return Figure, FigureCanvasAgg, imsave


def trace_patterns(layers: Sequence[int]) -> list[str]:
    """The stages the page reads: every layer's residual stream, and the attention and SwiGLU
    stages of the chosen `layers` (their probabilities [H, T, S] included)."""
    patterns = ["embed", "layers.*.out", "norm", "logits"]
    for i in layers:
        patterns += [f"layers.{i}.{s}" for s in LAYER_STAGES if s not in ("v", "h", "out")]
    return patterns


# ---------------------------------------------------------------------------------------------
# Small HTML pieces


def esc(x) -> str:
    return html.escape(str(x))


def token_piece(tokenizer, token_id: int) -> str:
    """A token's text as a reader can see it: spaces as ␣, line breaks as ↵, tabs as ⇥."""
    if tokenizer is None:
        return f"#{token_id}"
    text = tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def is_special(tokenizer, token_id: int) -> bool:
    return tokenizer is not None and token_id in tokenizer.special_ids


def source_listing(fn: Callable) -> str:
    """The source of a llama3_np function, as the running code has it."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    return (f'<details open class="source"><summary>source: <code>{esc(name)}</code></summary>'
            f'<pre data-function="{esc(name)}">{esc(inspect.getsource(fn))}</pre></details>')


def stage_line(stage: str, shape: Sequence[int]) -> str:
    """`shape_line` of a named stage, in the symbols the stage contract gives it."""
    return shape_line(stage, symbols(stage), shape)


def shape_line(stage: str, symbols: str, shape: Sequence[int], note: str = "") -> str:
    """`stage  [T, D] = [5, 576]`: a shape in the legend's symbols and in numbers."""
    numbers = "[" + ", ".join(str(d) for d in shape) + "]"
    return (f'<li><code>{esc(stage)}</code> <span class="shape" data-stage="{esc(stage)}" '
            f'data-shape="{numbers}">{esc(symbols)} = {numbers}</span>{(" " + note) if note else ""}</li>')


def shapes(*lines: str) -> str:
    return '<ul class="shapes">' + "".join(lines) + "</ul>"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """Cells are HTML already (callers escape text)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def num(value: float, stat: str, digits: int = 6) -> str:
    """A number with the exact value in a data attribute (for checks) and `digits` significant shown."""
    return f'<span class="num" data-stat="{esc(stat)}" data-value="{float(value)!r}">{float(value):.{digits}g}</span>'


def folded(summary: str, n_rows: int, content: str) -> str:
    """`content` under a summary line, open unless it is longer than OPEN_ROWS rows."""
    state = " open" if n_rows <= OPEN_ROWS else ""
    return f"<details{state}><summary>{esc(summary)}</summary>{content}</details>"


def section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>' + "".join(parts) + "</section>"


def para(text: str) -> str:
    return f"<p>{text}</p>"


def equation(text: str) -> str:
    return f'<div class="eq">{text}</div>'


# ---------------------------------------------------------------------------------------------
# Pictures


class Painter:
    """Draws matplotlib figures into base64 PNG <img> tags."""

    def __init__(self, dpi: int = 90):
        self.Figure, self.Canvas, self.imsave = load_matplotlib()
        self.dpi = dpi

    def figure(self, width: float, height: float):
        fig = self.Figure(figsize=(width, height), dpi=self.dpi, layout="constrained")
        self.Canvas(fig)
        return fig

    def img(self, fig, alt: str, cls: str = "plot") -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi, metadata={"Software": None})
        return self.embed(buf.getvalue(), alt, cls)

    def png(self, rgba: np.ndarray, alt: str, cls: str) -> str:
        """An image of pixels already drawn ([height, width, 4] uint8)."""
        buf = io.BytesIO()
        self.imsave(buf, rgba, format="png", dpi=self.dpi, metadata={"Software": None})
        return self.embed(buf.getvalue(), alt, cls)

    @staticmethod
    def embed(png: bytes, alt: str, cls: str) -> str:
        data = base64.b64encode(png).decode("ascii")
        return f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def label_ticks(ax, axis: str, labels: Sequence[str], inches: float = 5.0) -> None:
    step = max(1, math.ceil(len(labels) / (LABELS_PER_INCH * inches)))
    ticks = list(range(0, len(labels), step))
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)


def above(ax, columns: int) -> None:
    """The legend in a row above the plot, where it hides no data."""
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=columns, frameon=False)


class AttentionMaps:
    """The causal scores and probabilities of one query head, side by side with token labels.

    Hundreds of maps share one figure: its axes, labels and colour bars are drawn once, and each
    map redraws only its two images over that background (matplotlib's blitting), which keeps
    a page of every layer and head to seconds. The score colour bar therefore reads min .. max;
    the caption gives each map's range.
    """

    def __init__(self, painter: Painter, query_labels: Sequence[str], key_labels: Sequence[str]):
        T, S = len(query_labels), len(key_labels)
        side = min(5.4, 1.6 + 0.12 * max(T, S))
        self.painter = painter
        self.fig = painter.figure(2 * side + 0.6, side)
        self.width_px = round((2 * side + 0.6) * painter.dpi)
        self.axes = self.fig.subplots(1, 2)
        self.images = []
        for ax, title, cmap in zip(self.axes, ("scores q·kᵀ/√Dh", "probabilities"), ("coolwarm", "viridis")):
            im = ax.imshow(np.zeros((T, S)), cmap=cmap, interpolation="nearest", aspect="auto", vmin=0, vmax=1,
                           animated=True)
            im.set_cmap(im.get_cmap().with_extremes(bad="#e8e8e8"))  # grey: the masked future
            bar = self.fig.colorbar(im, ax=ax, shrink=0.8)
            if title.startswith("scores"):
                bar.set_ticks([0, 1], labels=["min", "max"])
            label_ticks(ax, "x", key_labels, side - 1.2)
            label_ticks(ax, "y", query_labels, side - 1.2)
            ax.set_xlabel("key", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
            ax.set_title(title, fontsize=9)
            self.images.append(im)
        self.fig.canvas.draw()
        self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)

    def draw(self, scores: np.ndarray, probs: np.ndarray, title: str) -> str:
        # [T, S], [T, S] -> <img>; -inf scores are the causal mask
        masked = np.ma.masked_invalid(scores)
        canvas = self.fig.canvas
        canvas.restore_region(self.background)
        self.images[0].set_data(masked)
        self.images[0].set_clim(float(masked.min()), float(masked.max()))
        self.images[1].set_data(np.ma.masked_where(masked.mask, probs))
        for ax, im in zip(self.axes, self.images):
            ax.draw_artist(im)
        return self.painter.png(np.asarray(canvas.buffer_rgba()), title, cls="attn")


# ---------------------------------------------------------------------------------------------
# The page


@dataclasses.dataclass
class Walk:
    """What one page shows: the model, the tokens, and the stages `forward` recorded."""

    config: ModelConfig
    weights: Mapping[str, np.ndarray]
    trace: Mapping[str, np.ndarray]
    tokens: list[int]
    pos: int
    context: list[int]
    tokenizer: object
    layers: list[int]
    heads: list[int]
    model_name: str

    @property
    def T(self) -> int:
        return len(self.tokens)

    @property
    def S(self) -> int:
        return len(self.context) + len(self.tokens)


def legend(w: Walk) -> str:
    c = w.config
    items = [("T", w.T, "tokens in this pass"), ("S", w.S, "tokens attended to (cached + T)"),
             ("D", c.dim, "model dim"), ("H", c.n_heads, "query heads"), ("KV", c.n_kv_heads, "key/value heads"),
             ("Dh", c.head_dim, "head dim"), ("F", c.ffn_dim, "feed-forward dim"), ("V", c.vocab_size, "vocabulary")]
    cells = "".join(f'<span class="sym" data-symbol="{s}"><b>{s}</b> = {n} <small>{esc(what)}</small></span>'
                    for s, n, what in items)
    return f'<div class="legend">{cells}</div>'


def tokens_section(w: Walk) -> str:
    rows = []
    for k, t in enumerate(w.context + w.tokens):
        special = is_special(w.tokenizer, t)
        cached = k < len(w.context)
        position = (k if cached else w.pos + k - len(w.context))
        piece = f'<span class="piece{" special" if special else ""}">{esc(token_piece(w.tokenizer, t))}</span>'
        rows.append([str(position), f'<span class="tid">{t}</span>', piece,
                     ("special" if special else "") + (" in the KV cache" if cached else "")])
    note = ("" if w.tokenizer is not None else
            para("The checkpoint has no tokenizer: tokens are shown by id."))
    return section("tokens", "1. Tokens",
                   para("The tokenizer cuts the text into pieces and maps each to an id (byte-level BPE). "
                        "Special tokens (such as the beginning-of-text marker) are marked."),
                   note, table(["position", "id", "piece", "note"], rows, cls="tokens"),
                   shapes(shape_line("tokens", "[T]", (w.T,))))


def config_section(w: Walk) -> str:
    c = w.config
    s = c.rope_scaling
    scaling = ("none" if s is None else
               f"llama3: factor {s.factor:g}, low_freq_factor {s.low_freq_factor:g}, "
               f"high_freq_factor {s.high_freq_factor:g}, original context {s.original_context}")
    rows = [("dim", "D", c.dim), ("n_layers", "", c.n_layers), ("n_heads", "H", c.n_heads),
            ("n_kv_heads", "KV", c.n_kv_heads), ("head_dim", "Dh", c.head_dim), ("ffn_dim", "F", c.ffn_dim),
            ("vocab_size", "V", c.vocab_size), ("norm_eps", "ε", f"{c.norm_eps:g}"),
            ("rope_theta", "θ", f"{c.rope_theta:g}"), ("rope_scaling", "", scaling),
            ("max_seq_len", "", c.max_seq_len), ("tie_embeddings", "", c.tie_embeddings)]
    return section("config", "2. Configuration",
                   para(f"Every number the math takes comes from the checkpoint's config "
                        f"(<code>ModelConfig</code>), here of <code>{esc(w.model_name)}</code>. "
                        f"{c.n_heads} query heads share {c.n_kv_heads} key/value heads: "
                        f"{c.n_rep} query heads per key/value head."),
                   table(["field", "symbol", "value"],
                         [[f"<code>{k}</code>", sym, f'<span data-config="{k}">{esc(v)}</span>']
                          for k, sym, v in rows], cls="config"))


def rms(x: np.ndarray) -> np.ndarray:  # [T, D] -> [T]
    x = np.asarray(x, dtype=np.float64)
    return np.sqrt(np.mean(x * x, axis=-1))


def embedding_section(w: Walk, p: Painter) -> str:
    c = w.config
    first = w.layers[0]
    before_name = "embed" if first == 0 else f"layers.{first - 1}.out"
    after_name = f"layers.{first}.attn_norm"
    before, after = rms(w.trace[before_name]), rms(w.trace[after_name])
    labels = [token_piece(w.tokenizer, t) for t in w.tokens]
    fig = p.figure(6.4, 2.6)
    ax = fig.subplots()
    idx = np.arange(w.T)
    ax.bar(idx - 0.2, before, 0.4, label=f"{before_name} (before)")
    ax.bar(idx + 0.2, after, 0.4, label=f"{after_name} (after)")
    label_ticks(ax, "x", labels)
    ax.set_ylabel("RMS over D")
    above(ax, 2)
    rows = [[str(k), f'<span class="piece">{esc(labels[k])}</span>', num(before[k], f"rms:{before_name}:{k}"),
             num(after[k], f"rms:{after_name}:{k}")] for k in range(w.T)]
    return section("embedding", "3. Embedding and RMSNorm",
                   para("Each token id selects one row of the embedding matrix. Before attention and before the "
                        "feed-forward network, RMSNorm rescales each token's vector to a root mean square of 1 "
                        f"and multiplies it by a learned gain per dimension (shown for layer {first})."),
                   equation("x = E[t] &nbsp;&nbsp; RMSNorm(x) = x / √(mean(x²) + ε) ⊙ g"),
                   shapes(shape_line("tok_embeddings", "[V, D]", (c.vocab_size, c.dim)),
                          stage_line("embed", w.trace["embed"].shape),
                          shape_line(after_name, "[T, D]", w.trace[after_name].shape)),
                   p.img(fig, "per-token RMS before and after RMSNorm"),
                   table(["t", "token", f"RMS of {before_name}", f"RMS of {after_name}"], rows, cls="nums"),
                   source_listing(model.embed), source_listing(model.rmsnorm))


def rope_section(w: Walk, p: Painter) -> str:
    c = w.config
    Dh = c.head_dim
    freqs = rope_frequencies(c)
    plain = rope_frequencies(dataclasses.replace(c, rope_scaling=None))
    i = np.arange(Dh // 2)
    fig = p.figure(6.4, 2.8)
    ax = fig.subplots()
    ax.semilogy(i, plain, label="θ^(−2i/Dh)")
    s = c.rope_scaling
    if s is not None:
        ax.semilogy(i, freqs, label=f"llama3 scaling (factor {s.factor:g})")
        wavelen = 2 * math.pi / plain
        blend = np.nonzero((wavelen >= s.original_context / s.high_freq_factor)
                           & (wavelen <= s.original_context / s.low_freq_factor))[0]
        if blend.size:
            ax.axvspan(blend[0] - 0.5, blend[-1] + 0.5, color="orange", alpha=0.2, label="blended band")
    ax.set_xlabel("pair i (dims 2i, 2i+1)")
    ax.set_ylabel("frequency (radians / position)")
    ax.legend(fontsize=7)
    freq_img = p.img(fig, "rope frequency per pair")

    positions = w.pos + np.arange(w.T)
    cos, sin = rope_cos_sin(positions, freqs)
    pairs = sorted({0, 1, Dh // 8, Dh // 4, Dh // 2 - 1})
    fig = p.figure(6.4, 2.6)
    ax = fig.subplots()
    for j in pairs:
        ax.plot(positions, np.arctan2(sin[:, j], cos[:, j]), marker="o", ms=3, label=f"pair {j}")
    ax.set_xlabel("position")
    ax.set_ylabel("angle (wrapped to ±π)")
    above(ax, len(pairs))
    angle_img = p.img(fig, "rope angle of a few pairs across positions")

    scaling = ("This checkpoint has no rope scaling: the two curves are one." if s is None else
               f"Llama 3.1+ scaling divides long wavelengths (&gt; {s.original_context / s.low_freq_factor:g} "
               f"positions) by {s.factor:g}, keeps short ones (&lt; {s.original_context / s.high_freq_factor:g}) "
               "and blends in between (shaded).")
    parts = [para("RoPE rotates each pair of dimensions (2i, 2i+1) of every query and key head by an angle "
                  "proportional to the token's position, so q·k depends on the distance between tokens. "
                  + scaling),
             equation("ω<sub>i</sub> = θ<sup>−2i/Dh</sup> &nbsp;&nbsp; (q<sub>2i</sub> + i q<sub>2i+1</sub>) "
                      "· e<sup>i·p·ω<sub>i</sub></sup>"),
             shapes(shape_line("frequencies", "[Dh/2]", freqs.shape),
                    shape_line("cos, sin", "[T, Dh/2]", cos.shape),
                    *[stage_line(f"layers.{j}.{n}", w.trace[f"layers.{j}.{n}"].shape)
                      for j in w.layers[:1] for n in ("q", "q_rope", "k", "k_rope")]),
             freq_img, angle_img,
             source_listing(model.rope_frequencies), source_listing(model.rope_cos_sin), source_listing(model.rope)]
    return section("rope", "4. RoPE: rotary position embedding", *parts)


def attention_scores(q_rope: np.ndarray, k_rope: np.ndarray, head: int, n_rep: int) -> np.ndarray:
    # [T, H, Dh], [S, KV, Dh] -> [T, S]
    """The causal scores of one query head: q·kᵀ/√Dh + mask, against its key/value head."""
    T, _, Dh = q_rope.shape
    S = k_rope.shape[0]
    q = q_rope[:, head].astype(np.float32)  # [T, Dh]
    k = k_rope[:, head // n_rep].astype(np.float32)  # [S, Dh]
    return (q @ k.T) / np.float32(math.sqrt(Dh)) + causal_mask(T, S)


def attention_section(w: Walk, p: Painter) -> str:
    c = w.config
    groups = "".join(f"<li>key/value head {j} ← query heads "
                     f"{', '.join(str(h) for h in range(j * c.n_rep, (j + 1) * c.n_rep))}</li>"
                     for j in range(c.n_kv_heads))
    parts = [para("Each query head scores every key it may see (itself and earlier tokens) by a scaled dot "
                  "product, turns the scores into probabilities with a softmax, and averages the value "
                  "vectors with them. Grouped-query attention: several query heads read the same key/value "
                  "head."),
             equation("A = softmax(q<sub>rope</sub> k<sub>rope</sub>ᵀ / √Dh + M) &nbsp;&nbsp; "
                      "out = A v &nbsp;&nbsp; M<sub>ts</sub> = −∞ for s in the future of t"),
             f'<ul class="gqa">{groups}</ul>']
    if w.context:
        parts.append(para(f"The KV cache holds {len(w.context)} tokens before these: queries see S = {w.S} keys."))
    T, S, KV, Dh = w.T, w.S, c.n_kv_heads, c.head_dim
    i = w.layers[0]
    parts.append(shapes(stage_line(f"layers.{i}.q_rope", w.trace[f"layers.{i}.q_rope"].shape),
                        shape_line("keys (k_rope, cached + new)", "[KV, S, Dh]", (KV, S, Dh)),
                        stage_line(f"layers.{i}.probs", w.trace[f"layers.{i}.probs"].shape),
                        stage_line(f"layers.{i}.attn", w.trace[f"layers.{i}.attn"].shape),
                        stage_line(f"layers.{i}.attn_out", w.trace[f"layers.{i}.attn_out"].shape)))
    maps = AttentionMaps(p, [token_piece(w.tokenizer, t) for t in w.tokens],
                         [token_piece(w.tokenizer, t) for t in w.context + w.tokens])
    for i in w.layers:
        probs = w.trace[f"layers.{i}.probs"]  # [H, T, S]
        q_rope = w.trace[f"layers.{i}.q_rope"]
        k_rope = w.trace[f"layers.{i}.k_rope"]
        figures = []
        for h in w.heads:
            if w.context:  # the cached keys are not in this pass's trace; log probs are the scores
                with np.errstate(divide="ignore"):  # up to a constant per row, -inf where masked
                    scores = np.log(probs[h])
                kind = "log probabilities"
            else:
                scores = attention_scores(q_rope, k_rope, h, c.n_rep)
                kind = "scores"
            title = f"layer {i}, query head {h} (key/value head {h // c.n_rep})"
            finite = scores[np.isfinite(scores)]
            figures.append(f'<figure class="attn-map" data-layer="{i}" data-head="{h}" '
                           f'style="flex-basis: {maps.width_px}px">'
                           f'{maps.draw(scores, probs[h], title)}<figcaption>{esc(title)}; {kind} from '
                           f'{finite.min():.3g} to {finite.max():.3g}</figcaption></figure>')
        x_norm = np.linalg.norm(w.trace["embed" if i == 0 else f"layers.{i - 1}.out"].astype(np.float64), axis=-1)
        out_norm = np.linalg.norm(w.trace[f"layers.{i}.attn_out"].astype(np.float64), axis=-1)
        rows = [[str(t), esc(token_piece(w.tokenizer, w.tokens[t])), num(x_norm[t], f"norm:x:{i}:{t}"),
                 num(out_norm[t], f"norm:layers.{i}.attn_out:{t}")] for t in range(T)]
        parts.append(f'<div class="layer" data-layer="{i}"><h3>Layer {i}</h3>'
                     f'<div class="maps">{"".join(figures)}</div>'
                     + folded(f"layer {i}: the norm of each token's vector, and of what attention adds to it", T,
                              table(["t", "token", "‖x‖ (block input)", "‖attn_out‖ (added to it)"], rows, cls="nums"))
                     + "</div>")
    parts += [source_listing(model.attention), source_listing(model.causal_attention),
              source_listing(model.causal_mask), source_listing(model.softmax)]
    return section("attention", "5. Attention", *parts)


def swiglu_section(w: Walk, p: Painter) -> str:
    c = w.config
    parts = [para("The feed-forward network of each block is gated: one projection (w1, the gate) passes "
                  "through SiLU and multiplies another (w3, up) element by element; w2 projects back to D. "
                  "SiLU lets positive gates through and squashes negative ones towards zero."),
             equation("FFN(x) = w2 · (silu(w1 x) ⊙ w3 x) &nbsp;&nbsp; silu(z) = z · σ(z)")]
    if w.layers:
        i = w.layers[0]
        parts.append(shapes(stage_line(f"layers.{i}.ffn_norm", w.trace[f"layers.{i}.ffn_norm"].shape),
                            shape_line("w1, w3", "[F, D]", (c.ffn_dim, c.dim)),
                            stage_line(f"layers.{i}.ffn_hidden", w.trace[f"layers.{i}.ffn_hidden"].shape),
                            stage_line(f"layers.{i}.ffn_out", w.trace[f"layers.{i}.ffn_out"].shape)))
    gates, hiddens, rows = [], [], []
    for i in w.layers:
        # The gate is inside swiglu, not a stage of its own: recomputed from the recorded input.
        gate = linear(w.trace[f"layers.{i}.ffn_norm"], w.weights[f"layers.{i}.feed_forward.w1.weight"])  # [T, F]
        hidden = w.trace[f"layers.{i}.ffn_hidden"]  # [T, F]
        gates.append(gate.ravel())
        hiddens.append(hidden.ravel())
        rows.append([str(i), num(gate.mean(), f"gate_mean:{i}", 4), num((gate < 0).mean(), f"gate_negative:{i}", 3),
                     num(hidden.astype(np.float64).std(), f"std:layers.{i}.ffn_hidden", 4),
                     num(np.abs(hidden).max(), f"max_abs:layers.{i}.ffn_hidden", 4)])
    fig = p.figure(6.8 if len(w.layers) <= 8 else 10.4, 2.6)
    axes = fig.subplots(1, 2)
    step = math.ceil(len(w.layers) / 16)  # layer numbers that fit under a box
    for ax, values, title in zip(axes, (gates, hiddens), ("gate w1·x", "silu(w1·x) ⊙ w3·x")):
        ax.boxplot(values, positions=range(len(values)), whis=(1, 99), showfliers=False)
        ax.set_xticks(range(0, len(values), step), [str(i) for i in w.layers[::step]], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    parts += [p.img(fig, "SwiGLU distributions per layer"),
              para("Boxes: quartiles and median over all T·F values of a layer; whiskers: 1st and 99th percentile."),
              folded("per layer: the gate's mean and share below zero, the product's spread", len(rows),
                     table(["layer", "mean gate", "share of gate &lt; 0", "std of ffn_hidden", "max |ffn_hidden|"],
                           rows, cls="nums")),
              source_listing(model.swiglu), source_listing(model.silu)]
    return section("swiglu", "6. SwiGLU feed-forward", *parts)


def residual_norms(w: Walk) -> np.ndarray:  # -> [n_layers + 1, T]
    """‖x‖ of every token: the embedding, then the output of each layer."""
    names = ["embed"] + [f"layers.{i}.out" for i in range(w.config.n_layers)]
    return np.stack([np.linalg.norm(w.trace[n].astype(np.float64), axis=-1) for n in names])


def residual_section(w: Walk, p: Painter) -> str:
    L = w.config.n_layers
    norms = residual_norms(w)
    labels = [token_piece(w.tokenizer, t) for t in w.tokens]
    fig = p.figure(6.8, 2.2 + 0.12 * min(w.T, 60))
    ax = fig.subplots()
    # Logarithmic colours: a few tokens (often the first) carry norms a hundred times the others'.
    im = ax.imshow(norms.T, aspect="auto", cmap="magma", interpolation="nearest", norm="log")
    fig.colorbar(im, ax=ax, label="‖x‖ (log scale)")
    ax.set_xticks(range(L + 1), ["emb"] + [str(i) for i in range(L)], fontsize=7)
    ax.set_xlabel("after layer")
    label_ticks(ax, "y", labels)
    shown = sorted({0, 1, L // 2 + 1, L})  # columns of the table: embed, layer 0, middle, last
    names = ["embed" if j == 0 else f"layers.{j - 1}.out" for j in shown]
    rows = [[str(t), esc(labels[t])] + [num(norms[j, t], f"norm:{n}:{t}") for j, n in zip(shown, names)]
            for t in range(w.T)]
    return section("residual", "7. The residual stream",
                   para("Each block adds its attention output and its feed-forward output to the stream it "
                        "reads: the stream carries every token's vector from the embedding to the final norm. "
                        "Its norm per token, after every layer:"),
                   equation("h = x + attention(RMSNorm(x)) &nbsp;&nbsp; out = h + FFN(RMSNorm(h))"),
                   shapes(shape_line("layers.i.out", "[T, D]", w.trace[f"layers.{L - 1}.out"].shape,
                                     f"for each of the {L} layers")),
                   p.img(fig, "residual stream norm per token and layer"),
                   table(["t", "token"] + [f"‖{esc(n)}‖" for n in names], rows, cls="nums"),
                   source_listing(model.transformer_block))


def top_tokens(probs: np.ndarray, k: int) -> list[tuple[int, float]]:  # [V] -> [(id, p)]
    ids = np.argsort(-probs, kind="stable")[:k]
    return [(int(t), float(probs[t])) for t in ids]


def logit_lens(w: Walk) -> list[list[tuple[int, float]]]:
    """For the last token: the top tokens each layer's output would predict through the final norm
    and the output matrix (nostalgebraist's "logit lens")."""
    norm_w = as_float32(w.weights["norm.weight"])
    lens = []
    for i in range(w.config.n_layers):
        x = w.trace[f"layers.{i}.out"][-1:]  # [1, D]
        logits = linear(rmsnorm(x, norm_w, w.config.norm_eps), w.weights["output.weight"])  # [1, V]
        lens.append(top_tokens(softmax(logits.astype(np.float32))[0], LENS_K))
    return lens


def token_cell(w: Walk, t: int, attrs: str) -> str:
    """A token's piece and id; `attrs` (data-*) tag the id for readers of the page's numbers."""
    cls = "piece special" if is_special(w.tokenizer, t) else "piece"
    return (f'<span class="{cls}">{esc(token_piece(w.tokenizer, t))}</span> '
            f'<small class="tid" {attrs} data-value="{t}">{t}</small>')


def logits_section(w: Walk, p: Painter) -> str:
    c = w.config
    logits = w.trace["logits"]
    probs = softmax(logits[-1:].astype(np.float32).copy())[0]
    top = top_tokens(probs, TOP_K)
    fig = p.figure(6.4, 0.4 + 0.25 * len(top))
    ax = fig.subplots()
    ax.barh(range(len(top))[::-1], [q for _, q in top], color="#4a7ab0")
    ax.set_yticks(range(len(top))[::-1], [token_piece(w.tokenizer, t) for t, _ in top], fontsize=8)
    ax.set_xlabel("probability")
    rows = [[str(r + 1), token_cell(w, t, f'data-top-id="{r}"'), num(q, f"top_prob:{r}"),
             num(logits[-1, t], f"top_logit:{r}")] for r, (t, q) in enumerate(top)]
    lens_rows = [[str(i)] + [f'{token_cell(w, t, f"data-lens-id={i!r}")} {num(q, f"lens:{i}:{r}", 3)}'
                             for r, (t, q) in enumerate(guesses)]
                 for i, guesses in enumerate(logit_lens(w))]
    last = token_piece(w.tokenizer, w.tokens[-1])
    return section("logits", "8. Final norm, logits and the next token",
                   para("A last RMSNorm, then the output matrix turns each token's vector into one score per "
                        "vocabulary entry; a softmax of the last token's scores is the distribution of the "
                        f"next token (after “{esc(last)}”)."),
                   equation("logits = RMSNorm(x<sub>L</sub>) · Wₒᵤₜᵀ &nbsp;&nbsp; P(next) = softmax(logits<sub>T−1</sub>)"),
                   shapes(stage_line("norm", w.trace["norm"].shape),
                          shape_line("output", "[V, D]", (c.vocab_size, c.dim),
                                     "(the embedding matrix itself)" if c.tie_embeddings else ""),
                          stage_line("logits", logits.shape)),
                   p.img(fig, "top next-token candidates"),
                   table(["rank", "token", "probability", "logit"], rows, cls="nums top"),
                   "<h3>Logit lens</h3>",
                   para("What the stream would predict for the next token if it stopped after each layer: "
                        "each layer's output for the last token through the final norm and the output matrix."),
                   table(["layer"] + [f"top {r + 1}" for r in range(LENS_K)], lens_rows, cls="nums lens"),
                   source_listing(model.forward))


CSS = """
:root { --fg: #1d2230; --muted: #5b6475; --accent: #2f5d9b; --line: #d9dde5; --code: #f5f6f8; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); max-width: 62rem; margin: 1.5rem auto; padding: 0 1.2rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 2px solid var(--accent); padding-bottom: .2rem;
     margin-top: 2.4rem; } h3 { margin: 1.4rem 0 .4rem; }
.meta { color: var(--muted); margin-top: 0; }
.legend { display: flex; flex-wrap: wrap; gap: .3rem .9rem; background: var(--code); border: 1px solid var(--line);
          padding: .5rem .8rem; border-radius: 6px; }
.legend small { color: var(--muted); }
nav ol { columns: 2; margin: .6rem 0; }
.eq { font: 1.05rem/1.6 "Cambria Math", "STIX Two Math", Georgia, serif; background: #eef3fb;
      border-left: 4px solid var(--accent); padding: .4rem .9rem; margin: .8rem 0; }
code, pre { font-family: ui-monospace, "SF Mono", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: .85rem; }
pre { background: var(--code); border: 1px solid var(--line); padding: .6rem .8rem; overflow-x: auto;
      white-space: pre-wrap; border-radius: 4px; margin: .3rem 0 .8rem; }
summary { cursor: pointer; color: var(--muted); font-size: .9rem; }
ul.shapes { list-style: none; padding: 0; margin: .5rem 0; display: flex; flex-wrap: wrap; gap: .2rem 1.4rem; }
.shape { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; color: var(--accent); }
table { border-collapse: collapse; margin: .6rem 0; font-size: .88rem; }
th, td { border-bottom: 1px solid var(--line); padding: .15rem .6rem; text-align: left; }
th { background: var(--code); }
table.nums td { font-variant-numeric: tabular-nums; }
.piece { font-family: ui-monospace, Menlo, Consolas, monospace; background: #fff6d8; padding: 0 .2rem;
         border-radius: 3px; white-space: pre; }
.piece.special { background: #f9d9d9; color: #8a1f1f; font-weight: 600; }
.tid { color: var(--muted); }
img { max-width: 100%; height: auto; }
.maps { display: flex; flex-wrap: wrap; gap: .6rem; }
figure.attn-map { margin: 0; flex: 0 1 auto; }
figure.attn-map figcaption { font-size: .8rem; color: var(--muted); }
.stats { font-size: .88rem; color: var(--muted); }
footer { margin-top: 3rem; color: var(--muted); font-size: .85rem; }
@media print {
  body { max-width: none; margin: 0; font-size: 11pt; }
  h2 { break-after: avoid; } figure, img, table, .eq { break-inside: avoid; }
  pre { white-space: pre-wrap; font-size: 8pt; }
}
"""


def render_page(w: Walk) -> str:
    """The HTML page of one recorded forward pass."""
    painter = Painter()
    with warnings.catch_warnings():
        # A token in a script the plotting font lacks is drawn as a box; the tables give its text.
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
        sections = [tokens_section(w), config_section(w), embedding_section(w, painter), rope_section(w, painter),
                    attention_section(w, painter), swiglu_section(w, painter), residual_section(w, painter),
                    logits_section(w, painter)]
    text = (w.tokenizer.decode(w.tokens) if w.tokenizer is not None
            else ", ".join(str(t) for t in w.tokens))
    nav = "".join(f'<li><a href="#{a}">{esc(t)}</a></li>' for a, t in (
        ("tokens", "Tokens"), ("config", "Configuration"), ("embedding", "Embedding and RMSNorm"),
        ("rope", "RoPE"), ("attention", "Attention"), ("swiglu", "SwiGLU"), ("residual", "Residual stream"),
        ("logits", "Final norm and logits")))
    layers = ", ".join(str(i) for i in w.layers)
    heads = ", ".join(str(h) for h in w.heads)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>llama3_np walkthrough: {esc(text[:60])}</title><style>{CSS}</style></head><body>"
            f"<h1>One forward pass of Llama 3, step by step</h1>"
            f'<p class="meta">Model <code>{esc(w.model_name)}</code>, {w.config.n_layers} layers; prompt '
            f'<span class="piece">{esc(text)}</span>; attention shown for layers {layers} and query heads '
            f'{heads}. Every number below was computed by <code>llama3_np</code> for this prompt; every '
            f'listing is the code that computed it.</p>'
            f"{legend(w)}<nav><ol>{nav}</ol></nav>{''.join(sections)}"
            f"<footer>Written by llama3_np {esc(__version__)} (<code>llama3-np walkthrough</code>).</footer>"
            "</body></html>\n")


def walkthrough_page(weights: Mapping[str, np.ndarray], config: ModelConfig, trace: Mapping[str, np.ndarray],
                     tokens: Sequence[int], *, layers: Sequence[int], heads: Sequence[int], pos: int = 0,
                     context: Sequence[int] = (), tokenizer=None, model_name: str = "") -> str:
    """The page of one forward pass whose stages `trace` holds (recorded with `trace_patterns(layers)`).

    tokens: the T ids of the pass, the first at rope position `pos`, after `context` (ids already in
    the KV cache). layers, heads: the layers whose attention, SwiGLU and shapes are drawn and the
    query heads whose maps are drawn (at least one of each; 0 <= h < n_heads). tokenizer: for token pieces (None: ids).
    Raises Llama3Error when matplotlib is missing or a layer or head is out of range.
    """
    bad_layers = [i for i in layers if not 0 <= i < config.n_layers]
    bad_heads = [h for h in heads if not 0 <= h < config.n_heads]
    if bad_layers or bad_heads or not layers or not heads:
        raise Llama3Error(f"layers must be in 0..{config.n_layers - 1} and heads in 0..{config.n_heads - 1}, "
                          f"got layers {list(layers)}, heads {list(heads)}")
    w = Walk(config, weights, trace, list(tokens), pos, list(context), tokenizer, sorted(set(layers)),
             sorted(set(heads)), model_name)
    return render_page(w)
