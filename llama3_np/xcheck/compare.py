"""`llama3-np compare A.safetensors B.safetensors`: where two dumps of the same forward pass part.

Both files are dump files (see `llama3_np.xcheck.dump`) of the same computation: the same model on the
same tokens at the same positions; B is the reference. For every stage the two have in common, in
model order:

    max abs    max |a - b|
    max rel    max |a - b| / max |b|   (relative to the stage's largest reference value, so that
                                        entries near zero do not dominate)
    NMSE       sum (a - b)² / sum b²   (normalised mean squared error)
    cosine     a·b / (|a| |b|)

A stage diverges when its NMSE exceeds the tolerance (or, with `rel_tol`, its max rel does), or
when non-finite values differ. The first diverging stage in model order is where to look: every
later stage inherits the error. Metadata that do not change the computation (the producer, how a
checkpoint stores tied embeddings, its format) may differ and are listed; dumps of different
computations are refused (`dump.metadata_differences`, a Llama3Error). `llama3-np compare` exits
with status 1 when a stage diverges, 0 otherwise, 2 when the two files cannot be compared.

The default tolerance, NMSE 3e-9, is measured: docs/DESIGN.md ("Numerical facts") gives the
measurement and why one number serves every stage kind. When either dump was computed in bfloat16
or float16 (its `dtype` metadata), the default is that precision's tolerance per stage kind
(`KIND_NMSE_TOLS`, measured by tools/calibrate_compare.py --compute DTYPE); a float32 dump against
a bfloat16 one is compared at bfloat16's, and the report says so.

No tolerance that passes a float32 dump against a bfloat16 one can see one rounding left out, so
every stage of a dump computed in bfloat16 or float16 is also checked to hold only values of that
dtype, as every stage of transformers', llama-models' and llama3_np's such dumps does: a stage that
holds others diverges whatever the tolerance, and `StageError.note` says which dump holds them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

import numpy as np

from ..errors import Llama3Error, ParameterError
from ..stages import LAYER_STAGES, stage_order
from .dump import PRODUCER_KEYS, Dump, format_shape, metadata_differences, read_dump

DEFAULT_NMSE_TOL = 3e-9  # measured: docs/DESIGN.md, "Numerical facts"
STAGE_KINDS = ("embed", *(s for s in LAYER_STAGES if s != "probs"), "norm", "logits")
PRECISIONS = ("bfloat16", "float16", "float32", "float64")  # a dump's `dtype`, the least precise first
# The default NMSE per stage kind of dumps computed in bfloat16 or float16: ten times the worst noise
# between llama3_np (in that mode and in float32) and transformers in that dtype, rounded up to one
# digit (`proposed_nmse_tols` of tests/fixtures/xcheck/compare_calibration_bfloat16.json and
# tests/fixtures/xcheck/compare_calibration_float16.json; docs/DESIGN.md).
KIND_NMSE_TOLS = {
    "bfloat16": {"embed": 0.0, "attn_norm": 0.5, "q": 0.2, "k": 0.3, "v": 0.6, "q_rope": 0.2, "k_rope": 0.3,
                 "attn": 0.2, "attn_out": 0.2, "h": 2.0, "ffn_norm": 0.3, "ffn_hidden": 0.8, "ffn_out": 0.8,
                 "out": 2.0, "norm": 0.08, "logits": 0.4},
    "float16": {"embed": 0.0, "attn_norm": 0.003, "q": 0.002, "k": 0.002, "v": 0.004, "q_rope": 0.002,
                "k_rope": 0.002, "attn": 0.004, "attn_out": 0.003, "h": 0.005, "ffn_norm": 0.003,
                "ffn_hidden": 0.006, "ffn_out": 0.02, "out": 0.005, "norm": 0.002, "logits": 0.004},
}


def off_dtype(x: np.ndarray, dtype: str) -> int:
    """How many finite values of float32 array `x` are not values of `dtype` (bfloat16 or float16).
    Exact: a bfloat16 value is a float32 whose low 16 bits are zero; a float16 value survives the
    round trip through float16."""
    x = np.asarray(x, np.float32)
    finite = x[np.isfinite(x)]
    if dtype == "bfloat16":
        return int(np.count_nonzero(finite.view(np.uint32) & 0xFFFF))
    with np.errstate(over="ignore"):
        return int(np.count_nonzero(finite.astype(np.float16).astype(np.float32) != finite))


def stage_kind(name: str) -> Optional[str]:
    """What a stage computes, without its layer: `layers.3.q_rope` -> `q_rope`, `logits` ->
    `logits`; None for a name that is not a stage."""
    order = stage_order(name)
    if order[0] == 1:
        return LAYER_STAGES[order[2]]
    return name if order[0] in (0, 2) else None


@dataclass
class StageError:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    nmse: float
    cosine: float
    diverged: bool
    note: str = ""  # why it diverges besides its NMSE: values off its dump's dtype, inf or NaN


@dataclass
class Comparison:
    a: str  # paths
    b: str
    a_producer: str  # "producer, dtype" from the metadata
    b_producer: str
    nmse_tol: float  # with kind_tols: the largest of them
    rel_tol: Optional[float]
    stages: list[StageError]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    precision_note: str = ""  # why the tolerance is not float32's, when the dumps' dtypes chose it
    kind_tols: Optional[dict[str, float]] = None  # the tolerance per stage kind, when it chose them
    metadata_differences: dict[str, tuple[str, str]] = field(default_factory=dict)  # see dump_cmd

    @property
    def diverged(self) -> list[str]:
        return [s.name for s in self.stages if s.diverged]

    @property
    def first_divergence(self) -> Optional[str]:
        return next(iter(self.diverged), None)


def stage_error(name: str, a: np.ndarray, b: np.ndarray, nmse_tol: float = DEFAULT_NMSE_TOL,
                rel_tol: Optional[float] = None) -> StageError:
    """The error measures of one stage `a` against its reference `b` (same shape), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    shape = tuple(a.shape)
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.all():
        # Non-finite entries must be identical in both (a masked -inf, say); the rest is measured.
        same = np.array_equal(a[~finite], b[~finite], equal_nan=True)
        if not same:
            where = [x for x, v in (("A", a), ("B", b)) if not np.isfinite(v).all()]
            note = (f"inf or NaN in {where[0]} where {'AB'.replace(where[0], '')} is finite" if len(where) == 1
                    else "inf or NaN in different places")
            return StageError(name, shape, math.inf, math.inf, math.inf, math.nan, True, note)
        a, b = a[finite], b[finite]
    diff = a - b
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    ref_max = float(np.max(np.abs(b))) if b.size else 0.0
    ref_energy, diff_energy = float(np.sum(b * b)), float(np.sum(diff * diff))
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
    nmse = diff_energy / ref_energy if ref_energy > 0 else (0.0 if diff_energy == 0 else math.inf)
    norms = math.sqrt(float(np.sum(a * a)) * ref_energy)
    cosine = float(np.sum(a * b)) / norms if norms > 0 else float(diff_energy == 0)
    diverged = not nmse <= nmse_tol or (rel_tol is not None and not max_rel <= rel_tol)
    return StageError(name, shape, max_abs, max_rel, nmse, cosine, diverged)


def compare_stages(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                   nmse_tol: float = DEFAULT_NMSE_TOL, rel_tol: Optional[float] = None) -> list[StageError]:
    """Every stage of `a` that `b` also has, against `b` (the reference), in model order.

    a, b: stage name -> array: a dump's stages, a `stages.Trace`, a torch reference's stages.
    Raises ValueError when a stage has different shapes in the two.
    """
    names = sorted((n for n in a if n in b), key=stage_order)
    for name in names:
        if np.shape(a[name]) != np.shape(b[name]):
            raise ValueError(f"stage {name!r}: shape {list(np.shape(a[name]))} vs {list(np.shape(b[name]))}")
    return [stage_error(n, a[n], b[n], nmse_tol, rel_tol) for n in names]


def _producer(d: Dump) -> str:
    return ", ".join(d.metadata[k] for k in PRODUCER_KEYS if k in d.metadata) or "producer unknown"


def default_tolerances(dtype_a: str, dtype_b: str) -> tuple[Optional[dict[str, float]], str]:
    """The default NMSE tolerance per stage kind for dumps computed in `dtype_a` and `dtype_b`
    (their `dtype` metadata; anything else counts as float32): the less precise dtype's
    (`KIND_NMSE_TOLS`), with a line saying so; (None, "") for float32 and float64, whose default is
    DEFAULT_NMSE_TOL at every stage."""
    known = [d if d in PRECISIONS else "float32" for d in (dtype_a, dtype_b)]
    lower = min(known, key=PRECISIONS.index)
    if lower not in KIND_NMSE_TOLS:
        return None, ""
    how = (f"A was computed in {known[0]}, B in {known[1]}: compared at {lower}'s" if known[0] != known[1]
           else f"both computed in {lower}: compared at its")
    return KIND_NMSE_TOLS[lower], f"{how} default tolerance per stage kind (q_rope {KIND_NMSE_TOLS[lower]['q_rope']:.0e})"


def compare_dumps(path_a, path_b, nmse_tol: Optional[float] = None,
                  rel_tol: Optional[float] = None) -> Comparison:
    """Every common stage of dump A against reference dump B, in model order.

    nmse_tol: None for the default of the dumps' dtypes (`default_tolerances`).
    Raises Llama3Error when a tolerance is negative or not finite, and when the files are not
    dumps of the same computation (`metadata_differences`, different stage shapes).
    """
    a, b = read_dump(path_a), read_dump(path_b)
    kind_tols, note = None, ""
    if nmse_tol is None:
        kind_tols, note = default_tolerances(a.metadata.get("dtype", "float32"), b.metadata.get("dtype", "float32"))
        nmse_tol = DEFAULT_NMSE_TOL if kind_tols is None else max(kind_tols.values())
    if not (nmse_tol >= 0 and math.isfinite(nmse_tol)):
        raise ParameterError("nmse_tol", f"nmse_tol must be a number >= 0, got {nmse_tol}")
    if rel_tol is not None and not (rel_tol >= 0 and math.isfinite(rel_tol)):
        raise ParameterError("rel_tol", f"rel_tol must be a number >= 0, got {rel_tol}")
    differences = metadata_differences(a, b)
    names_b = set(b.names)
    common = [n for n in a.names if n in names_b]
    if not common:
        raise Llama3Error(f"{a.path} and {b.path} have no stage in common: are both dump files?")
    for name in common:
        if a.shape(name) != b.shape(name):
            raise Llama3Error(f"stage {name!r} has shape {list(a.shape(name))} in {a.path} but "
                              f"{list(b.shape(name))} in {b.path}: the dumps do not record the same "
                              "computation (different model or token count)")
    stages = [stage_error(n, a.stage(n), b.stage(n), nmse_tol if kind_tols is None else kind_tols[stage_kind(n)],
                          rel_tol) for n in common]
    for s in stages:
        for label, d in (("A", a), ("B", b)):
            dtype = d.metadata.get("dtype")
            if dtype in KIND_NMSE_TOLS and not s.note and (off := off_dtype(d.stage(s.name), dtype)):
                s.diverged = True
                s.note = (f"{label} holds {off:,} of {math.prod(s.shape):,} values that are not {dtype}, which "
                          f"{label} says it computed in: a cast is missing there")
    return Comparison(str(a.path), str(b.path), _producer(a), _producer(b), nmse_tol, rel_tol, stages,
                      only_in_a=[n for n in a.names if n not in names_b],
                      only_in_b=[n for n in b.names if n not in set(a.names)],
                      metadata_differences=differences, precision_note=note, kind_tols=kind_tols)


# ---------------------------------------------------------------------------------------------
# Reports


def verdict(c: Comparison) -> str:
    """One line: agree, or the first stage where the dumps part."""
    tol = ("its stage kind's NMSE" if c.kind_tols else f"NMSE {c.nmse_tol:.0e}") + (
        f" and max rel {c.rel_tol:.0e}" if c.rel_tol is not None else "")
    n = len(c.stages)
    if c.first_divergence is None:
        return f"verdict: agree ({n} of {n} common stages within {tol})"
    first = next(s for s in c.stages if s.diverged)
    why = f"; {first.note}" if first.note else ""
    return f"verdict: diverge at {first.name} ({len(c.diverged)} of {n} stages past {tol}{why})"


def format_table(c: Comparison, all_stages: bool = False) -> str:
    """The report `llama3-np compare` prints: the two files, metadata that differ, the stages past
    tolerance (every stage with `all_stages`), stages in one file only, a summary line and the
    verdict line."""
    lines = [f"A: {c.a} ({c.a_producer})", f"B: {c.b} ({c.b_producer}), the reference"]
    if c.precision_note:
        lines.append(c.precision_note)
    if c.metadata_differences:
        lines.append("metadata that differ (the inputs agree): " + "; ".join(
            f"{key} {va} vs {vb}" for key, (va, vb) in c.metadata_differences.items()))
    rows = c.stages if all_stages else [s for s in c.stages if s.diverged]
    if rows:
        width = max(len("stage"), *(len(s.name) for s in rows))
        shape_width = max(len("shape"), *(len(format_shape(s.shape)) for s in rows))
        lines.append(f"{'stage':<{width}}  {'shape':<{shape_width}}  {'max abs':>10}  {'max rel':>10}  "
                     f"{'NMSE':>10}  {'cosine':>12}")
        first = c.first_divergence
        for s in rows:
            mark = "  <- first divergence" if s.name == first else ("  diverges" if s.diverged else "")
            mark += f": {s.note}" if s.note else ""
            lines.append(f"{s.name:<{width}}  {format_shape(s.shape):<{shape_width}}  {s.max_abs:10.3e}  "
                         f"{s.max_rel:10.3e}  {s.nmse:10.3e}  {s.cosine:12.10f}{mark}")
    for label, names in (("only in A", c.only_in_a), ("only in B", c.only_in_b)):
        if names:
            lines.append(f"{label} ({len(names)}): {', '.join(names)}")
    worst = max(c.stages, key=lambda s: s.nmse)
    hidden = "" if len(rows) == len(c.stages) else "; --all lists every stage"
    lines.append(f"{len(c.stages)} common stages, {len(c.diverged)} past tolerance; largest NMSE "
                 f"{worst.nmse:.2e} ({worst.name}){hidden}")
    lines.append(verdict(c))
    return "\n".join(lines)


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # JSON has no inf or nan


def to_json(c: Comparison) -> dict:
    stages = []
    for s in c.stages:
        d = asdict(s)
        d.update(shape=list(s.shape), **{k: _finite_or_none(d[k]) for k in ("max_abs", "max_rel", "nmse", "cosine")})
        stages.append(d)
    return {"a": c.a, "b": c.b, "nmse_tol": c.nmse_tol, "rel_tol": c.rel_tol, "stages": stages,
            "diverged": c.diverged, "first_divergence": c.first_divergence,
            "only_in_a": c.only_in_a, "only_in_b": c.only_in_b,
            "metadata_differences": {k: list(v) for k, v in c.metadata_differences.items()},
            "precision_note": c.precision_note, "kind_tols": c.kind_tols,
            "verdict": verdict(c)}
