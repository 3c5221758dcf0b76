"""Training arithmetic after the gradients: AdamW, clipping by global norm, the learning-rate
schedule, gradient accumulation. Each follows one reference's exact semantics, named in its
docstring, so that a run here and the same run in PyTorch give the same parameters
(tests/test_optim.py holds them to torch's, from fixtures made by tools/make_grad_fixtures.py).

Parameters and their gradients are dicts of NumPy arrays keyed by canonical weight names
(`llama3_np.backward` returns them so); the optimizer updates the parameter arrays in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .errors import ParameterError


@dataclass
class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101, Algorithm 2),
    exactly as `torch.optim.AdamW` (torch 2.x, single-tensor path) computes one step t:

        θ ← θ · (1 - lr·λ)                                  decoupled weight decay, first
        m ← m + (1 - β1)·(g - m)                            torch's lerp: β1·m + (1-β1)·g
        v ← β2·v + (1 - β2)·g²                              (g² first, as torch's addcmul)
        θ ← θ - (lr / (1 - β1ᵗ)) · m / (√v / √(1 - β2ᵗ) + ε)  ε added after the bias correction

    Defaults are torch's (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2). The moments
    are kept in the parameters' dtype; `lr` may be changed between steps (a schedule sets it).
    Raises ParameterError for a learning rate, beta, eps or weight decay out of range.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    step_count: int = 0
    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        if not self.lr > 0:
            raise ParameterError("lr", f"learning rate must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ParameterError("betas", f"betas must be in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ParameterError("eps", f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ParameterError("weight_decay", f"weight decay must be >= 0, got {self.weight_decay}")

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """One update of every parameter that has a gradient, in place."""
        beta1, beta2 = self.betas
        self.step_count += 1
        t = self.step_count
        step_size = self.lr / (1 - beta1 ** t)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** t)
        for name, g in grads.items():
            p = params[name]
            m = self.exp_avg.setdefault(name, np.zeros_like(p))
            v = self.exp_avg_sq.setdefault(name, np.zeros_like(p))
            p *= p.dtype.type(1 - self.lr * self.weight_decay)
            m += p.dtype.type(1 - beta1) * (g - m)
            v *= p.dtype.type(beta2)
            v += p.dtype.type(1 - beta2) * (g * g)
            p -= p.dtype.type(step_size) * (m / (np.sqrt(v) / p.dtype.type(bias_correction2_sqrt) + p.dtype.type(self.eps)))

    def state(self) -> dict[str, np.ndarray]:
        """The optimizer's state as named arrays (`exp_avg.NAME`, `exp_avg_sq.NAME`, `step`), for a
        checkpoint; `from_state` restores it."""
        out = {f"exp_avg.{k}": a for k, a in self.exp_avg.items()}
        out.update({f"exp_avg_sq.{k}": a for k, a in self.exp_avg_sq.items()})
        out["step"] = np.array(self.step_count, dtype=np.int64)
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.step_count = int(state["step"])
        self.exp_avg = {k[len("exp_avg."):]: np.array(a) for k, a in state.items() if k.startswith("exp_avg.")}
        self.exp_avg_sq = {k[len("exp_avg_sq."):]: np.array(a) for k, a in state.items()
                           if k.startswith("exp_avg_sq.")}


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale every gradient in place by min(1, max_norm / (‖g‖ + 1e-6)), where ‖g‖ is the 2-norm
    of all gradients together; return ‖g‖ before clipping.

    As `torch.nn.utils.clip_grad_norm_` (torch 2.x): the norm of the per-tensor norms, the 1e-6
    in the denominator, and the scaling applied even when the factor is 1.
    Raises ParameterError when max_norm is not > 0.
    """
    if not max_norm > 0:
        raise ParameterError("max_grad_norm", f"the gradient norm limit must be > 0, got {max_norm}")
    norms = [np.linalg.norm(g.ravel()) for g in grads.values()]
    dtype = next(iter(grads.values())).dtype
    total = np.linalg.norm(np.array(norms, dtype=dtype))
    factor = min(dtype.type(max_norm) / (total + dtype.type(1e-6)), dtype.type(1.0))
    for g in grads.values():
        g *= factor
    return float(total)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at `step`: linear from 0 to 1 over `warmup_steps`, then half a
    cosine from 1 to 0 at `total_steps`.

    As `transformers.get_cosine_schedule_with_warmup` (num_cycles 0.5): step / warmup before the
    warmup ends, 0.5·(1 + cos(π·progress)) after, progress = (step - warmup) / (total - warmup).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def accumulate(total: dict[str, np.ndarray] | None, grads: Mapping[str, np.ndarray],
               n_micro: int) -> dict[str, np.ndarray]:
    """Gradient accumulation: add grads / n_micro into `total` (a new dict on the first call), so
    that n_micro micro-batches of mean losses give the gradient of their mean."""
    scale = 1 / n_micro
    if total is None:
        return {k: g * g.dtype.type(scale) for k, g in grads.items()}
    for k, g in grads.items():
        total[k] += g * g.dtype.type(scale)
    return total
