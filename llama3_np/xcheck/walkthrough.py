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

This module computes what the page shows; how it reads (the text, the HTML, the style) is the
Jinja2 template beside it, `walkthrough.html.jinja`. Pictures are drawn with matplotlib and
embedded as base64 PNG: the page needs no network, script, font or style sheet from elsewhere.
matplotlib and jinja2 are the optional `viz` extra (`pip install 'llama3_np[viz]'`).
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import io
import math
import warnings
from pathlib import Path
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


def load_jinja():
    """A Jinja2 environment for the page's template (beside this module), escaping every value."""
    try:
        import jinja2
    except ImportError:
        raise Llama3Error(f"the walkthrough writes its page from a Jinja2 template, and jinja2 is not installed: "
                          f"{VIZ_EXTRA}") from None
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(exact=lambda v: repr(float(v)),  # the value itself, for readers of the numbers
                       sig=lambda v, digits: f"{float(v):.{digits}g}",
                       dims=lambda shape: "[" + ", ".join(str(int(d)) for d in shape) + "]")
    return env


def require_viz() -> None:
    """Raise Llama3Error naming the `viz` extra when matplotlib or jinja2 is missing."""
    load_matplotlib()
    load_jinja()


# ---------------------------------------------------------------------------------------------
# What the page shows of a token


def token_piece(tokenizer, token_id: int) -> str:
    """A token's text as a reader can see it: spaces as ␣, line breaks as ↵, tabs as ⇥ (the
    page's Tokens section says so)."""
    if tokenizer is None:
        return f"#{token_id}"
    text = tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def is_special(tokenizer, token_id: int) -> bool:
    return tokenizer is not None and token_id in tokenizer.special_ids


def piece(tokenizer, token_id: int) -> dict:
    return {"id": token_id, "text": token_piece(tokenizer, token_id), "special": is_special(tokenizer, token_id)}


def source(fn: Callable) -> tuple[str, str]:
    """(dotted name, source) of a llama3_np function, as the running code has it."""
    return f"{fn.__module__}.{fn.__qualname__}", inspect.getsource(fn)


# ---------------------------------------------------------------------------------------------
# Pictures


class Painter:
    """Draws matplotlib figures as base64 PNG pictures (`{"src", "alt", "cls"}` for the template)."""

    def __init__(self, dpi: int = 90):
        self.Figure, self.Canvas, self.imsave = load_matplotlib()
        self.dpi = dpi

    def figure(self, width: float, height: float):
        fig = self.Figure(figsize=(width, height), dpi=self.dpi, layout="constrained")
        self.Canvas(fig)
        return fig

    def img(self, fig, alt: str, cls: str = "plot") -> dict:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi, metadata={"Software": None})
        return self.embed(buf.getvalue(), alt, cls)

    def png(self, rgba: np.ndarray, alt: str, cls: str) -> dict:
        """A picture of pixels already drawn ([height, width, 4] uint8)."""
        buf = io.BytesIO()
        self.imsave(buf, rgba, format="png", dpi=self.dpi, metadata={"Software": None})
        return self.embed(buf.getvalue(), alt, cls)

    @staticmethod
    def embed(png: bytes, alt: str, cls: str) -> dict:
        return {"src": "data:image/png;base64," + base64.b64encode(png).decode("ascii"), "alt": alt, "cls": cls}


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


def broken_at_wraps(x: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [N], [N] -> [M], [M] with M >= N
    """A wrapped angle's points with NaN put between neighbours more than π apart (where the angle
    went round from π to −π or back), so that a line plot draws no segment across the jump."""
    jumps = np.nonzero(np.abs(np.diff(angle)) > np.pi)[0] + 1
    return np.insert(np.asarray(x, dtype=np.float64), jumps, np.nan), np.insert(angle.astype(np.float64), jumps, np.nan)


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

    def draw(self, scores: np.ndarray, probs: np.ndarray, title: str) -> dict:
        # [T, S], [T, S] -> picture; -inf scores are the causal mask
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
# The page: what each section shows, computed here; how it reads, in walkthrough.html.jinja


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

    def pieces(self) -> list[dict]:
        return [piece(self.tokenizer, t) for t in self.tokens]

    def shape(self, stage: str, note: str = "") -> tuple:
        """A shape line of a named stage, in the symbols the stage contract gives it."""
        return stage, symbols(stage), self.trace[stage].shape, note


def legend(w: Walk) -> list[tuple]:
    c = w.config
    return [("T", w.T, "tokens in this pass"), ("S", w.S, "tokens attended to (cached + T)"),
            ("D", c.dim, "model dim"), ("H", c.n_heads, "query heads"), ("KV", c.n_kv_heads, "key/value heads"),
            ("Dh", c.head_dim, "head dim"), ("F", c.ffn_dim, "feed-forward dim"), ("V", c.vocab_size, "vocabulary")]


def tokens_section(w: Walk) -> dict:
    rows = []
    for k, t in enumerate(w.context + w.tokens):
        cached = k < len(w.context)
        p = piece(w.tokenizer, t)
        rows.append({"position": k if cached else w.pos + k - len(w.context), "piece": p,
                     "note": ("special" if p["special"] else "") + (" in the KV cache" if cached else "")})
    return {"rows": rows, "T": w.T, "has_tokenizer": w.tokenizer is not None}


def config_rows(w: Walk) -> list[tuple]:
    c = w.config
    s = c.rope_scaling
    scaling = ("none" if s is None else
               f"llama3: factor {s.factor:g}, low_freq_factor {s.low_freq_factor:g}, "
               f"high_freq_factor {s.high_freq_factor:g}, original context {s.original_context}")
    return [("dim", "D", c.dim), ("n_layers", "", c.n_layers), ("n_heads", "H", c.n_heads),
            ("n_kv_heads", "KV", c.n_kv_heads), ("head_dim", "Dh", c.head_dim), ("ffn_dim", "F", c.ffn_dim),
            ("vocab_size", "V", c.vocab_size), ("norm_eps", "ε", f"{c.norm_eps:g}"),
            ("rope_theta", "θ", f"{c.rope_theta:g}"), ("rope_scaling", "", scaling),
            ("max_seq_len", "", c.max_seq_len), ("tie_embeddings", "", c.tie_embeddings)]


def rms(x: np.ndarray) -> np.ndarray:  # [T, D] -> [T]
    x = np.asarray(x, dtype=np.float64)
    return np.sqrt(np.mean(x * x, axis=-1))


def embedding_section(w: Walk, p: Painter) -> dict:
    c = w.config
    first = w.layers[0]
    before_name = "embed" if first == 0 else f"layers.{first - 1}.out"
    after_name = f"layers.{first}.attn_norm"
    x = w.trace[before_name]
    # The norm without its gain is no stage of its own: the specification's rmsnorm with g = 1.
    normed = rmsnorm(x, np.ones(c.dim, dtype=np.float32), c.norm_eps)  # [T, D]
    before, middle, after = rms(x), rms(normed), rms(w.trace[after_name])
    labels = [token_piece(w.tokenizer, t) for t in w.tokens]
    fig = p.figure(6.4, 2.6)
    ax = fig.subplots()
    idx = np.arange(w.T)
    ax.bar(idx - 0.27, before, 0.27, label=f"{before_name} (before)")
    ax.bar(idx, middle, 0.27, label="after the norm (RMS 1)")
    ax.bar(idx + 0.27, after, 0.27, label=f"after the gain: {after_name}")
    label_ticks(ax, "x", labels)
    ax.set_ylabel("RMS over D")
    above(ax, 3)
    return {"layer": first, "before": before_name, "after": after_name,
            "shapes": [("tok_embeddings", "[V, D]", (c.vocab_size, c.dim), ""), w.shape("embed"),
                       (after_name, "[T, D]", w.trace[after_name].shape, "")],
            "picture": p.img(fig, "per-token RMS before RMSNorm, after the norm and after the gain"),
            "rows": [{"piece": pc, "before": b, "normed": n, "after": a}
                     for pc, b, n, a in zip(w.pieces(), before, middle, after)],
            "sources": [source(model.embed), source(model.rmsnorm)]}


def rope_section(w: Walk, p: Painter) -> dict:
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
        line, = ax.plot(*broken_at_wraps(positions, np.arctan2(sin[:, j], cos[:, j])), label=f"pair {j}")
        ax.plot(positions, np.arctan2(sin[:, j], cos[:, j]), "o", ms=3, color=line.get_color())
    ax.set_xlabel("position")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("angle (wrapped to ±π)")
    ax.set_yticks([-math.pi, 0, math.pi], ["−π", "0", "π"])
    above(ax, len(pairs))
    return {"scaling": s, "long": s and s.original_context / s.low_freq_factor,
            "short": s and s.original_context / s.high_freq_factor,
            "shapes": [("frequencies", "[Dh/2]", freqs.shape, ""), ("cos, sin", "[T, Dh/2]", cos.shape, ""),
                       *[w.shape(f"layers.{j}.{n}") for j in w.layers[:1] for n in ("q", "q_rope", "k", "k_rope")]],
            "frequencies": freq_img, "angles": p.img(fig, "rope angle of a few pairs across positions"),
            "sources": [source(model.rope_frequencies), source(model.rope_cos_sin), source(model.rope)]}


def attention_scores(q_rope: np.ndarray, k_rope: np.ndarray, head: int, n_rep: int) -> np.ndarray:
    # [T, H, Dh], [S, KV, Dh] -> [T, S]
    """The causal scores of one query head: q·kᵀ/√Dh + mask, against its key/value head."""
    T, _, Dh = q_rope.shape
    S = k_rope.shape[0]
    q = q_rope[:, head].astype(np.float32)  # [T, Dh]
    k = k_rope[:, head // n_rep].astype(np.float32)  # [S, Dh]
    return (q @ k.T) / np.float32(math.sqrt(Dh)) + causal_mask(T, S)


def attention_section(w: Walk, p: Painter) -> dict:
    c = w.config
    maps = AttentionMaps(p, [token_piece(w.tokenizer, t) for t in w.tokens],
                         [token_piece(w.tokenizer, t) for t in w.context + w.tokens])
    layers = []
    for i in w.layers:
        probs = w.trace[f"layers.{i}.probs"]  # [H, T, S]
        q_rope = w.trace[f"layers.{i}.q_rope"]
        k_rope = w.trace[f"layers.{i}.k_rope"]
        drawn = []
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
            drawn.append({"head": h, "title": title, "kind": kind, "low": finite.min(), "high": finite.max(),
                          "picture": maps.draw(scores, probs[h], title)})
        x_norm = np.linalg.norm(w.trace["embed" if i == 0 else f"layers.{i - 1}.out"].astype(np.float64), axis=-1)
        out_norm = np.linalg.norm(w.trace[f"layers.{i}.attn_out"].astype(np.float64), axis=-1)
        layers.append({"i": i, "maps": drawn, "rows": [{"piece": pc, "x": x, "out": o}
                                                       for pc, x, o in zip(w.pieces(), x_norm, out_norm)]})
    i = w.layers[0]
    return {"groups": [(j, list(range(j * c.n_rep, (j + 1) * c.n_rep))) for j in range(c.n_kv_heads)],
            "cached": len(w.context), "S": w.S, "width_px": maps.width_px, "layers": layers,
            "shapes": [w.shape(f"layers.{i}.q_rope"),
                       ("keys (k_rope, cached + new)", "[KV, S, Dh]", (c.n_kv_heads, w.S, c.head_dim), ""),
                       w.shape(f"layers.{i}.probs"), w.shape(f"layers.{i}.attn"), w.shape(f"layers.{i}.attn_out")],
            "sources": [source(model.attention), source(model.causal_attention), source(model.causal_mask),
                        source(model.softmax)]}


def swiglu_section(w: Walk, p: Painter) -> dict:
    c = w.config
    gates, hiddens, rows = [], [], []
    for i in w.layers:
        # The gate is inside swiglu, not a stage of its own: recomputed from the recorded input.
        gate = linear(w.trace[f"layers.{i}.ffn_norm"], w.weights[f"layers.{i}.feed_forward.w1.weight"])  # [T, F]
        hidden = w.trace[f"layers.{i}.ffn_hidden"]  # [T, F]
        gates.append(gate.ravel())
        hiddens.append(hidden.ravel())
        rows.append({"i": i, "gate_mean": gate.mean(), "gate_negative": (gate < 0).mean(),
                     "std": hidden.astype(np.float64).std(), "max_abs": np.abs(hidden).max()})
    fig = p.figure(6.8 if len(w.layers) <= 8 else 10.4, 2.6)
    axes = fig.subplots(1, 2)
    step = math.ceil(len(w.layers) / 16)  # layer numbers that fit under a box
    for ax, values, title in zip(axes, (gates, hiddens), ("gate w1·x", "silu(w1·x) ⊙ w3·x")):
        ax.boxplot(values, positions=range(len(values)), whis=(1, 99), showfliers=False)
        ax.set_xticks(range(0, len(values), step), [str(i) for i in w.layers[::step]], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    i = w.layers[0]
    return {"shapes": [w.shape(f"layers.{i}.ffn_norm"), ("w1, w3", "[F, D]", (c.ffn_dim, c.dim), ""),
                       w.shape(f"layers.{i}.ffn_hidden"), w.shape(f"layers.{i}.ffn_out")],
            "picture": p.img(fig, "SwiGLU distributions per layer"), "rows": rows,
            "sources": [source(model.swiglu), source(model.silu)]}


def residual_norms(w: Walk) -> np.ndarray:  # -> [n_layers + 1, T]
    """‖x‖ of every token: the embedding, then the output of each layer."""
    names = ["embed"] + [f"layers.{i}.out" for i in range(w.config.n_layers)]
    return np.stack([np.linalg.norm(w.trace[n].astype(np.float64), axis=-1) for n in names])


# The first token's norm, this many times the median of the others', is called outsized.
SINK_RATIO = 5.0


def attention_sink(w: Walk, norms: np.ndarray) -> dict | None:
    """The first token as an attention sink (Xiao et al. 2023, arXiv 2309.17453): after which layer
    its norm is largest against the median of the other tokens', how many times, and the mean
    probability the shown query heads of the last drawn layer give it from the later tokens.
    None when the pass does not start the sequence or has a single token."""
    if w.context or w.pos != 0 or w.T < 2:
        return None
    ratio = norms[1:, 0] / np.median(norms[1:, 1:], axis=1)  # [L]: after each layer
    layer = int(np.argmax(ratio))
    last = w.layers[-1]
    probs = w.trace[f"layers.{last}.probs"][w.heads, 1:, 0]  # [heads, T - 1]: later queries on key 0
    return {"layer": layer, "ratio": float(ratio[layer]), "outsized": bool(ratio[layer] >= SINK_RATIO),
            "threshold": SINK_RATIO,
            "attention_layer": last, "attention": float(probs.mean())}


def residual_section(w: Walk, p: Painter) -> dict:
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
    return {"shapes": [("layers.i.out", "[T, D]", w.trace[f"layers.{L - 1}.out"].shape,
                        f"for each of the {L} layers")],
            "picture": p.img(fig, "residual stream norm per token and layer"),
            "sink": attention_sink(w, norms),
            "names": ["embed" if j == 0 else f"layers.{j - 1}.out" for j in shown],
            "rows": [{"piece": pc, "norms": [norms[j, t] for j in shown]} for t, pc in enumerate(w.pieces())],
            "sources": [source(model.transformer_block)]}


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


def logits_section(w: Walk, p: Painter) -> dict:
    c = w.config
    logits = w.trace["logits"]
    probs = softmax(logits[-1:].astype(np.float32).copy())[0]
    top = top_tokens(probs, TOP_K)
    fig = p.figure(6.4, 0.4 + 0.25 * len(top))
    ax = fig.subplots()
    ax.barh(range(len(top))[::-1], [q for _, q in top], color="#4a7ab0")
    ax.set_yticks(range(len(top))[::-1], [token_piece(w.tokenizer, t) for t, _ in top], fontsize=8)
    ax.set_xlabel("probability")
    return {"last": token_piece(w.tokenizer, w.tokens[-1]),
            "shapes": [w.shape("norm"), ("output", "[V, D]", (c.vocab_size, c.dim),
                                         "(the embedding matrix itself)" if c.tie_embeddings else ""),
                       w.shape("logits")],
            "picture": p.img(fig, "top next-token candidates"),
            "top": [{"piece": piece(w.tokenizer, t), "p": q, "logit": logits[-1, t]} for t, q in top],
            "lens_k": LENS_K,
            "lens": [[{"piece": piece(w.tokenizer, t), "p": q} for t, q in guesses] for guesses in logit_lens(w)],
            "sources": [source(model.forward)]}


NAV = (("tokens", "Tokens"), ("config", "Configuration"), ("embedding", "Embedding and RMSNorm"), ("rope", "RoPE"),
       ("attention", "Attention"), ("swiglu", "SwiGLU"), ("residual", "Residual stream"),
       ("logits", "Final norm and logits"))


def render_page(w: Walk) -> str:
    """The HTML page of one recorded forward pass."""
    template = load_jinja().get_template("walkthrough.html.jinja")
    painter = Painter()
    with warnings.catch_warnings():
        # A token in a script the plotting font lacks is drawn as a box; the tables give its text.
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
        sections = {"tokens": tokens_section(w), "config_rows": config_rows(w),
                    "embedding": embedding_section(w, painter), "rope": rope_section(w, painter),
                    "attention": attention_section(w, painter), "swiglu": swiglu_section(w, painter),
                    "residual": residual_section(w, painter), "logits": logits_section(w, painter)}
    text = (w.tokenizer.decode(w.tokens) if w.tokenizer is not None
            else ", ".join(str(t) for t in w.tokens))
    return template.render(text=text, model_name=w.model_name, config=w.config, layers=w.layers, heads=w.heads,
                           legend=legend(w), nav=NAV, open_rows=OPEN_ROWS, version=__version__, **sections)


def walkthrough_page(weights: Mapping[str, np.ndarray], config: ModelConfig, trace: Mapping[str, np.ndarray],
                     tokens: Sequence[int], *, layers: Sequence[int], heads: Sequence[int], pos: int = 0,
                     context: Sequence[int] = (), tokenizer=None, model_name: str = "") -> str:
    """The page of one forward pass whose stages `trace` holds (recorded with `trace_patterns(layers)`).

    tokens: the T ids of the pass, the first at rope position `pos`, after `context` (ids already in
    the KV cache). layers, heads: the layers whose attention, SwiGLU and shapes are drawn and the
    query heads whose maps are drawn (at least one of each; 0 <= h < n_heads). tokenizer: for token pieces (None: ids).
    Raises Llama3Error when matplotlib or jinja2 is missing or a layer or head is out of range.
    """
    bad_layers = [i for i in layers if not 0 <= i < config.n_layers]
    bad_heads = [h for h in heads if not 0 <= h < config.n_heads]
    if bad_layers or bad_heads or not layers or not heads:
        raise Llama3Error(f"layers must be in 0..{config.n_layers - 1} and heads in 0..{config.n_heads - 1}, "
                          f"got layers {list(layers)}, heads {list(heads)}")
    w = Walk(config, weights, trace, list(tokens), pos, list(context), tokenizer, sorted(set(layers)),
             sorted(set(heads)), model_name)
    return render_page(w)
