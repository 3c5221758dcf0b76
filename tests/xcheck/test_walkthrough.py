"""`llama3-np walkthrough`: the page holds every section, its shapes and numbers are those of a
`dump` of the same prompt, it draws exactly the attention maps asked for, its listings are the
running code, it loads nothing from outside itself, and bad input ends in one line on stderr with
exit status 2 and no file."""

import inspect
import re
import shutil
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from llama3_np import model
from llama3_np.assets import llama3_tokenizer_path
from llama3_np.formats.checkpoint import load_checkpoint, save_hf_checkpoint
from llama3_np.xcheck.dump import read_dump
from llama3_np.load import load_tokenizer
from tests.checkpoint_builders import random_weights, tiny_config
from tests.xcheck.test_dump import PARITY, assert_one_line_error, default_model, run_cli

SECTIONS = ["tokens", "config", "embedding", "rope", "attention", "swiglu", "residual", "logits"]
VOID = {"img", "meta", "br", "hr", "input", "link"}
# The page and the dump come from two runs of the same float32 code on the same input: they agree
# to the last bit; the page prints repr() of float64 statistics of float32 stages, the test
# recomputes them in float64 from the dump, so only summation order differs.
REL = 1e-9


class Page(HTMLParser):
    """Every element of the page as (tag, attributes, text content)."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self.stack = [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            self.elements.append((tag, dict(attrs), ""))
        else:
            self.stack.append((tag, dict(attrs), []))

    def handle_endtag(self, tag):
        while self.stack:
            open_tag, attrs, text = self.stack.pop()
            content = "".join(text)
            self.elements.append((open_tag, attrs, content))
            if self.stack:
                self.stack[-1][2].append(content)
            if open_tag == tag:
                return

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)

    def having(self, attr: str) -> list[tuple[str, dict, str]]:
        return [e for e in self.elements if attr in e[1]]

    def values(self) -> dict[str, float]:
        return {a["data-stat"]: float(a["data-value"]) for _, a, _ in self.having("data-stat")}


def walk(capsys, tmp_path, *args) -> Page:
    out = tmp_path / "w.html"
    code, stdout, err = run_cli(capsys, "walkthrough", *args, "-o", out)
    assert code == 0, err
    assert str(out) in stdout
    return Page(out.read_text(encoding="utf-8"))


def dump_of(capsys, tmp_path, *args):
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(capsys, "dump", *args, "-o", out)
    assert code == 0, err
    return read_dump(out)


def rms(x):
    return np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2, axis=-1))


def norm(x):
    return np.linalg.norm(np.asarray(x, dtype=np.float64), axis=-1)


def softmax64(logits):
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def check_against_dump(page: Page, dump, layers: list[int], heads: list[int], n_layers: int, weights, eps):
    """Sections, shapes, maps, listings and numbers of `page` against `dump` of the same prompt."""
    ids = [a.get("id") for t, a, _ in page.elements if t == "section"]
    assert sorted(ids) == sorted(SECTIONS), ids

    shapes = {a["data-stage"]: a["data-shape"] for _, a, _ in page.having("data-stage")}
    for stage, shape in shapes.items():
        if stage in dump.names:
            assert shape == "[" + ", ".join(map(str, dump.shape(stage))) + "]", stage
    T = len(dump.json_list("tokens"))
    assert shapes["tokens"] == f"[{T}]"
    assert {"embed", "norm", "logits", f"layers.{layers[0]}.attn", f"layers.{layers[0]}.ffn_hidden"} <= set(shapes)

    maps = [(int(a["data-layer"]), int(a["data-head"])) for t, a, _ in page.elements
            if t == "figure" and "attn-map" in a.get("class", "")]
    assert maps == [(i, h) for i in layers for h in heads]
    attn_imgs = [a for t, a, _ in page.elements if t == "img" and a.get("class") == "attn"]
    assert len(attn_imgs) == len(layers) * len(heads)

    listings = page.having("data-function")
    assert len(listings) >= 12
    for _, a, text in listings:
        module, _, name = a["data-function"].rpartition(".")
        assert module == "llama3_np.model"
        assert text == inspect.getsource(getattr(model, name)), a["data-function"]

    v = page.values()
    first = layers[0]
    before = "embed" if first == 0 else f"layers.{first - 1}.out"
    for k in range(T):
        assert v[f"rms:{before}:{k}"] == pytest.approx(rms(dump.stage(before)[k]), rel=REL)
        # The RMS after the norm (about 1: eps makes it a little less) and after the gain, both drawn.
        x = dump.stage(before)[k].astype(np.float64)
        assert v[f"rms:normed:{k}"] == pytest.approx(rms(x / np.sqrt(np.mean(x * x) + eps)), rel=1e-6)
        assert v[f"rms:layers.{first}.attn_norm:{k}"] == pytest.approx(rms(dump.stage(f"layers.{first}.attn_norm")[k]), rel=REL)
        for i in (0, n_layers - 1):
            assert v[f"norm:layers.{i}.out:{k}"] == pytest.approx(norm(dump.stage(f"layers.{i}.out")[k]), rel=REL)
        for i in layers:
            assert v[f"norm:layers.{i}.attn_out:{k}"] == pytest.approx(norm(dump.stage(f"layers.{i}.attn_out")[k]), rel=REL)
    for i in layers:
        hidden = dump.stage(f"layers.{i}.ffn_hidden").astype(np.float64)
        assert v[f"std:layers.{i}.ffn_hidden"] == pytest.approx(hidden.std(), rel=1e-6)
        assert v[f"max_abs:layers.{i}.ffn_hidden"] == np.abs(hidden).max()

    # The first token against the others: its largest norm ratio over the layers, the attention
    # sink's signature, with the number.
    norms = np.stack([norm(dump.stage(f"layers.{i}.out")) for i in range(n_layers)])  # [L, T]
    ratios = norms[:, 0] / np.median(norms[:, 1:], axis=1)
    assert v["sink:norm_ratio"] == pytest.approx(ratios.max(), rel=REL)
    sink = next(text for t, a, text in page.elements if t == "p" and a.get("class") == "sink")
    assert f"After layer {int(np.argmax(ratios))}, the first token's vector" in sink
    assert ("This is the attention sink" in sink) == (ratios.max() >= 5) != ("does not stand out" in sink)
    if f"layers.{layers[-1]}.probs" in dump.names:
        probs = dump.stage(f"layers.{layers[-1]}.probs")[heads, 1:, 0]
        assert v["sink:attention"] == pytest.approx(probs.astype(np.float64).mean(), rel=1e-6)
    # The glyphs that make spaces, line breaks and tabs visible are explained.
    glyphs = next(text for t, a, text in page.elements if t == "p" and a.get("class") == "glyphs")
    assert "␣ stands for a space, ↵ for a line break and ⇥ for a tab" in glyphs

    # The next-token candidates: the page's float32 softmax against float64 (rel 1e-5: float32 exp).
    logits = dump.stage("logits")[-1]
    probs = softmax64(logits)
    order = np.argsort(-probs, kind="stable")
    top = [int(a["data-value"]) for _, a, _ in page.having("data-top-id")]
    assert top[0] == order[0] and len(top) == 10
    for r, t in enumerate(top):
        assert v[f"top_prob:{r}"] == pytest.approx(probs[t], rel=1e-5, abs=1e-7)
        assert v[f"top_logit:{r}"] == logits[t]
    # The logit lens of the last layer is the model's own prediction; every layer's top guess is
    # the most probable token of that layer's output through the final norm and output matrix.
    assert v[f"lens:{n_layers - 1}:0"] == pytest.approx(v["top_prob:0"], rel=1e-5)
    lens_ids = [[int(a["data-value"]) for _, a, _ in page.having("data-lens-id") if a["data-lens-id"] == str(i)]
                for i in range(n_layers)]
    w_norm, w_out = weights["norm.weight"].astype(np.float64), weights["output.weight"].astype(np.float64)
    for i in range(n_layers):
        x = dump.stage(f"layers.{i}.out")[-1].astype(np.float64)
        p = softmax64(w_out @ (x / np.sqrt(np.mean(x * x) + eps) * w_norm))
        assert p[lens_ids[i][0]] == pytest.approx(p.max(), rel=1e-4), f"layer {i}"
        assert v[f"lens:{i}:0"] == pytest.approx(p.max(), rel=1e-4), f"layer {i}"


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory):
    """A 2-layer random Llama 3 checkpoint with the real 128k tokenizer (tied embeddings)."""
    tokenizer = llama3_tokenizer_path()
    assert tokenizer.is_file(), f"run `python tools/fetch_tokenizer.py` (make test does): {tokenizer}"
    folder = tmp_path_factory.mktemp("tiny_llama3")
    config = tiny_config(vocab_size=128256, tie_embeddings=True)
    save_hf_checkpoint(folder, config, random_weights(config, seed=3))
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder


def test_page_of_a_tiny_llama3_with_the_real_tokenizer(capsys, tmp_path, tiny_llama3):
    prompt = "Grüße, world: 12345!"
    args = ["-m", tiny_llama3, "-p", prompt]
    page = walk(capsys, tmp_path, *args, "--layers", "all", "--heads", "1,3")
    dump = dump_of(capsys, tmp_path, *args, "--stages", "*", "layers.*.probs")
    ckpt = load_checkpoint(tiny_llama3)
    check_against_dump(page, dump, [0, 1], [1, 3], 2, ckpt.weights, ckpt.config.norm_eps)

    tokens = load_tokenizer(tiny_llama3).encode(prompt)
    assert tokens[0] == 128000 and dump.json_list("tokens") == tokens
    assert [int(text) for t, a, text in page.elements if a.get("class") == "tid" and t == "span"] == tokens
    specials = [text for t, a, text in page.elements if a.get("class") == "piece special" and t == "span"]
    assert specials[0] == "<|begin_of_text|>"
    # Grouped-query sharing: 4 query heads over 2 key/value heads.
    groups = [text for t, a, text in page.elements if t == "li" and text.startswith("key/value head")]
    assert groups == ["key/value head 0 ← query heads 0, 1", "key/value head 1 ← query heads 2, 3"]
    # With rope scaling, the frequency picture names the blended band.
    assert any("blended" in a.get("alt", "") or "blends" in text for _, a, text in page.elements)


def test_page_of_the_default_model(capsys, tmp_path):
    """Defaults: the first and last layer, the query heads of the first key/value head (3 of 9)."""
    args = ["-m", default_model(), "-p", "The capital of France is"]
    page = walk(capsys, tmp_path, *args)
    dump = dump_of(capsys, tmp_path, *args)
    ckpt = load_checkpoint(default_model())
    check_against_dump(page, dump, [0, 29], [0, 1, 2], 30, ckpt.weights, ckpt.config.norm_eps)
    assert page.values()["sink:norm_ratio"] > 100  # "The": 163 times the others after layer 11
    config = {a["data-config"]: text for _, a, text in page.having("data-config")}
    assert (config["dim"], config["n_heads"], config["n_kv_heads"], config["rope_scaling"]) == ("576", "9", "3", "none")
    # The page of every layer and head (30 x 9 maps, measured by tools/render_walkthrough.py
    # --measure) must stay under 20 MB: the 6 maps here, scaled to 270, with the rest of the page.
    map_bytes = sum(len(a["src"]) for t, a, _ in page.elements if t == "img" and a.get("class") == "attn")
    page_bytes = (tmp_path / "w.html").stat().st_size
    assert map_bytes / 6 * 270 + (page_bytes - map_bytes) < 20e6, (map_bytes, page_bytes)


def test_the_page_is_self_contained(capsys, tmp_path):
    page = walk(capsys, tmp_path, "-m", PARITY / "llama3_2", "--tokens", "5,6,7", "--layers", "1", "--heads", "0")
    for tag, attrs, _ in page.elements:
        assert tag not in ("script", "link", "iframe"), tag
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:image/png;base64,", "#")), attrs[key][:60]
    text = (tmp_path / "w.html").read_text(encoding="utf-8")
    assert not re.search(r"url\(|@import|https?://", text)


@pytest.mark.parametrize("args, fragments", [
    (["--tokens", "1,2", "--layers", "2"], ["--layers", "0 to 1", "'2'"]),
    (["--tokens", "1,2", "--layers", "zero"], ["--layers"]),
    (["--tokens", "1,2", "--heads", "4"], ["--heads", "0 to 3", "'4'"]),
    (["--tokens", "1,2", "--heads", "0-x"], ["--heads"]),
    (["--tokens", ""], ["no tokens"]),
    ([], ["give the input"]),
])
def test_bad_input_is_one_line_exit_2_and_no_file(capsys, tmp_path, args, fragments):
    code, _, err = run_cli(capsys, "walkthrough", "-m", PARITY / "llama3_0", *args, "-o", tmp_path / "w.html")
    assert_one_line_error(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_and_unwritable_output_leave_no_file(capsys, tmp_path, tiny_llama3):
    code, _, err = run_cli(capsys, "walkthrough", "-m", tiny_llama3, "-p", "", "-o", tmp_path / "w.html")
    assert_one_line_error(code, err, "empty")
    code, _, err = run_cli(capsys, "walkthrough", "-m", tiny_llama3, "-p", "hi", "-o", tmp_path / "no" / "w.html")
    assert_one_line_error(code, err, "-o", "cannot write")
    code, _, err = run_cli(capsys, "walkthrough", "-m", tiny_llama3, "-p", "hi", "-o", tmp_path)
    assert_one_line_error(code, err, "-o", "is a folder")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_names_the_extra(capsys, tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    code, _, err = run_cli(capsys, "walkthrough", "-m", PARITY / "llama3_0", "--tokens", "1", "-o", tmp_path / "w.html")
    assert_one_line_error(code, err, "matplotlib", "pip install 'llama3_np[viz]'")
    assert list(tmp_path.iterdir()) == []


def test_a_wrapped_angle_is_drawn_without_a_line_across_the_jump():
    """The rope angle plot wraps at ±π: a line from just below π to just above −π would cross the
    whole picture, so the points are broken there (NaN between them) and nowhere else."""
    from llama3_np.xcheck.walkthrough import broken_at_wraps

    positions = np.arange(40)
    angle = np.arctan2(np.sin(0.7 * positions), np.cos(0.7 * positions))  # wraps every ~9 positions
    x, y = broken_at_wraps(positions, angle)
    assert np.array_equal(x[np.isfinite(x)], positions) and np.array_equal(y[np.isfinite(y)], angle)
    steps = np.abs(np.diff(y))
    assert np.all(steps[np.isfinite(steps)] < np.pi)  # no segment across the jump
    assert np.isnan(y).sum() == np.sum(np.abs(np.diff(angle)) > np.pi) == 4
