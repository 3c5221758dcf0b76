"""The canonical checkpoint before its data is read: the tensor names and shapes a config implies,
and how each tensor is made from what a file stores. Every format's scanner (`checkpoint` for
Hugging Face and Meta folders, `gguf_import` for GGUF files) builds these; `checkpoint.load_checkpoint`
reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..config import ModelConfig


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name and the shape the config implies for it."""
    shapes = {"tok_embeddings.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (c.n_heads * c.head_dim, c.dim),
            p + "attention.wk.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wv.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wo.weight": (c.dim, c.n_heads * c.head_dim),
            p + "attention_norm.weight": (c.dim,),
            p + "feed_forward.w1.weight": (c.ffn_dim, c.dim),
            p + "feed_forward.w2.weight": (c.dim, c.ffn_dim),
            p + "feed_forward.w3.weight": (c.ffn_dim, c.dim),
            p + "ffn_norm.weight": (c.dim,),
        })
    shapes["norm.weight"] = (c.dim,)
    shapes["output.weight"] = (c.vocab_size, c.dim)
    return shapes


# A layer's weights that multiply one input (q, k and v; the gate and the up projection), which the
# loaders hold as consecutive row blocks of one array, in this order, so that `linear.linears` runs
# each group as one product; the names keep Meta's separate matrices (views of that array).
JOINED = (("attention.wq", "attention.wk", "attention.wv"), ("feed_forward.w1", "feed_forward.w3"))


def joined_names(n_layers: int) -> list[tuple[str, ...]]:
    """Every layer's `JOINED` groups as canonical tensor names."""
    return [tuple(f"layers.{i}.{name}.weight" for name in group) for i in range(n_layers) for group in JOINED]


def row_blocks(whole, counts) -> list:
    """The consecutive row blocks of `whole`, `counts[i]` rows each, as views of it (a joined group's
    tensors)."""
    ends = np.cumsum(counts)
    return [whole[end - n:end] for n, end in zip(counts, ends)]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as one file stores it (a whole tensor, or one model-parallel shard of it)."""

    file: Path
    name: str  # its name in that file
    dtype: np.dtype
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]  # the stored array, memory-mapped where the file allows
    gguf: Optional[Any] = None  # a GGUF file's tensor (`gguf_file.GGUFTensor`): its blocks as stored


@dataclass(frozen=True)
class TensorPlan:
    """How one canonical tensor is made from what is stored."""

    pieces: tuple[StoredTensor, ...]  # one per file; several for Meta model-parallel shards
    shape: tuple[int, ...]  # canonical shape
    shard_axis: Optional[int] = None  # pieces concatenate along it; None: replicas, must be equal
    unpermute_heads: Optional[int] = None  # Hugging Face q/k: heads to un-permute

    @property
    def dtype(self) -> np.dtype:
        return self.pieces[0].dtype


@dataclass
class CheckpointIndex:
    """A validated checkpoint before any tensor data is read."""

    path: Path
    format: str  # "hf" | "meta" | "gguf"
    config: ModelConfig
    plans: dict[str, TensorPlan]  # canonical name -> plan; "output.weight" absent when tied
    files: list[Path]
    ignored: dict[str, str] = field(default_factory=dict)  # "file: tensor" -> why it is not needed
    tokenizer_dir: Optional[Path] = None
    eos_ids: tuple[int, ...] = ()
