"""Training a Llama 3 model in NumPy: text packed into sequences, the steps of AdamW on the
gradients of `llama3_np.backward`, validation, and checkpoints that resume bit for bit.

A step takes `batch_size` sequences (each a micro-batch: `model.forward` runs one sequence at a
time), averages their gradients (`optim.accumulate`), clips them by global norm, sets the learning
rate from the warmup + cosine schedule and updates the weights with AdamW. Which sequences a step
takes depends only on the seed and the step number (one random permutation of the sequences per
epoch), so a run resumed from a checkpoint takes the same sequences as the run that wrote it.

A checkpoint is a Hugging Face folder (`config.json`, float32 `model.safetensors`, which
`transformers` and llama3_np load) plus `optimizer.safetensors` (AdamW's moments and step) and
`trainer_state.json` (the arguments, the step, the loss history). The settings are named as
`transformers.TrainingArguments` names them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from .backward import cross_entropy, loss_and_gradients
from .config import ModelConfig, from_hf_config
from .errors import Llama3Error, ParameterError
from .files import AtomicFile, WriteError, atomic_folder, make_folder, read_json, write_bytes, write_text
from .formats.checkpoint import expected_shapes, save_hf_checkpoint
from .formats.safetensors_file import SafetensorsFile, write_safetensors
from .lora import LoraConfig, adapted, adapter_gradients, init_adapter, load_adapter, save_adapter
from .model import forward
from .optim import AdamW, accumulate, clip_grad_norm, cosine_with_warmup

# Small Llama 3 shapes to train from scratch, as Hugging Face config.json keys (the vocabulary is
# the tokenizer's). "15M" is the shape of llama2.c's stories15M (dim 288, 6 layers, 6 heads).
PRESETS = {
    "15M": {"hidden_size": 288, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 6,
            "num_key_value_heads": 6, "max_position_embeddings": 256},
    "tiny": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256},
}
# Files a checkpoint folder's tokenizer may consist of, copied into every checkpoint so that it loads alone.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
CHECKPOINT_PREFIX = "checkpoint-"

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass(frozen=True)
class TrainingArguments:
    """The settings of a run, with `transformers.TrainingArguments`' names and meanings (a step is
    one optimizer update over `batch_size` sequences of `seq_len` + 1 tokens)."""

    max_steps: int = 100
    seq_len: int = 128
    batch_size: int = 8
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    eval_steps: int = 50
    save_steps: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.max_steps < 1:
            raise ParameterError("max_steps", f"the number of steps must be >= 1, got {self.max_steps}")
        if self.seq_len < 1:
            raise ParameterError("seq_len", f"the sequence length must be >= 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise ParameterError("batch_size", f"the batch size must be >= 1, got {self.batch_size}")
        if self.eval_steps < 1:
            raise ParameterError("eval_steps", f"the validation interval must be >= 1 step, got {self.eval_steps}")
        if self.save_steps < 1:
            raise ParameterError("save_steps", f"the checkpoint interval must be >= 1 step, got {self.save_steps}")
        if self.warmup_steps < 0:
            raise ParameterError("warmup_steps", f"warmup steps must be >= 0, got {self.warmup_steps}")
        self.optimizer()  # AdamW checks the learning rate, betas, eps and weight decay
        if not self.max_grad_norm > 0:
            raise ParameterError("max_grad_norm", f"the gradient norm limit must be > 0, got {self.max_grad_norm}")

    def optimizer(self) -> AdamW:
        return AdamW(lr=self.learning_rate, betas=(self.adam_beta1, self.adam_beta2), eps=self.adam_epsilon,
                     weight_decay=self.weight_decay)


def pack(documents: Iterable[list[int]], seq_len: int, bos: Optional[int], eos: Optional[int]) -> np.ndarray:
    # -> [N, seq_len + 1] int64
    """Documents' ids as training sequences: each document framed by BOS and EOS (where the
    tokenizer has them), all concatenated, cut into windows of seq_len + 1 tokens that overlap by
    one (a window's inputs are its first seq_len tokens, its targets its last seq_len). The tail
    shorter than a window is dropped. Raises Llama3Error when the text makes no window."""
    stream: list[int] = []
    for ids in documents:
        stream += ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise Llama3Error(f"the text is {len(stream)} tokens long; a sequence needs {seq_len + 1} "
                          "(give more text or a smaller sequence length)")
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(stream, dtype=np.int64), seq_len + 1)
    return np.ascontiguousarray(windows[::seq_len][:n])


def init_weights(config: ModelConfig, seed: int, std: float = 0.02) -> dict[str, np.ndarray]:
    """Weights for training from scratch: every matrix normal(0, std), every norm weight 1, as
    transformers' `LlamaPreTrainedModel._init_weights` (initializer_range 0.02); float32."""
    rng = np.random.default_rng(seed)
    weights = {name: (np.ones(shape, dtype=np.float32) if len(shape) == 1 else
                      rng.normal(0, std, shape).astype(np.float32))
               for name, shape in expected_shapes(config).items()
               if not (name == "output.weight" and config.tie_embeddings)}
    if config.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights


@dataclass
class StepReport:
    """What one step did: its number (1 for the first), mean loss, learning rate, gradient norm
    before clipping, and the tokens it trained on."""

    step: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int


@dataclass
class Trainer:
    """A run in progress: the weights (float32, updated in place), the config, the packed training
    and validation sequences, the arguments, the optimizer and the step reached."""

    weights: dict[str, np.ndarray]
    config: ModelConfig
    train: np.ndarray  # [N, seq_len + 1]
    validation: Optional[np.ndarray]  # [M, seq_len + 1]
    args: TrainingArguments
    optimizer: AdamW = None
    step: int = 0
    history: list[dict] = field(default_factory=list)
    lora: Optional[LoraConfig] = None  # train LoRA adapters on the frozen weights instead of the weights
    adapter: Optional[dict[str, np.ndarray]] = None  # the adapters being trained (`llama3_np.lora`)

    def __post_init__(self):
        if self.lora is None:
            self.weights = trainable(self.weights, self.config)
        elif self.adapter is None:
            self.adapter = init_adapter(self.weights, self.config, self.lora, self.args.seed)
        if self.optimizer is None:
            self.optimizer = self.args.optimizer()

    def model_weights(self) -> Mapping[str, np.ndarray]:
        """What the forward pass computes with: the weights, or the frozen weights with their adapters."""
        return self.weights if self.lora is None else adapted(self.weights, self.adapter, self.lora.scale)

    def parameters(self) -> dict[str, np.ndarray]:
        """What the optimizer updates: every weight, or only the adapters."""
        return self.weights if self.lora is None else self.adapter

    def sequences(self, step: int) -> np.ndarray:  # -> [batch_size, seq_len + 1]
        """The sequences step `step` (0-based) trains on: the next batch_size of the epoch's
        permutation, a new permutation (from the seed and the epoch) each time the data run out."""
        n, b = len(self.train), self.args.batch_size
        index = step * b + np.arange(b)
        epochs, positions = index // n, index % n
        order = {e: np.random.default_rng([self.args.seed, int(e)]).permutation(n) for e in set(epochs.tolist())}
        return self.train[[order[int(e)][p] for e, p in zip(epochs, positions)]]

    def train_step(self) -> StepReport:
        """One optimizer update; returns what it did."""
        batch = self.sequences(self.step)
        weights = self.model_weights()
        total, losses = None, []
        for seq in batch:
            loss, grads = loss_and_gradients(weights, self.config, seq[:-1], seq[1:])
            if self.lora is not None:
                grads = adapter_gradients(grads, self.adapter, self.lora.scale)
            total = accumulate(total, grads, len(batch))
            losses.append(loss)
        norm = clip_grad_norm(total, self.args.max_grad_norm)
        lr = self.args.learning_rate * cosine_with_warmup(self.step, self.args.warmup_steps, self.args.max_steps)
        self.optimizer.lr = lr
        self.optimizer.step(self.parameters(), total)
        self.step += 1
        report = StepReport(self.step, float(np.mean(losses)), lr, norm, batch.shape[0] * (batch.shape[1] - 1))
        self.history.append(asdict(report))
        return report

    def evaluate(self) -> float:
        """Mean next-token loss over the validation sequences (its exp is their perplexity)."""
        if self.validation is None:
            raise Llama3Error("no validation text was given")
        weights = self.model_weights()
        losses = [cross_entropy(forward(weights, self.config, seq[:-1]), seq[1:])[0] for seq in self.validation]
        return float(np.mean(losses))

    def save(self, folder: Path, extra_files: Mapping[str, bytes] = {}) -> None:
        """Write a checkpoint into `folder` (new or empty; `save_checkpoint` renames it into place,
        `files.atomic_folder`, so that a checkpoint is never seen half-written)."""
        make_folder(folder)
        if self.lora is None:
            save_hf_checkpoint(folder, self.config, self.weights, dtype=np.float32,
                               extra_config={"torch_dtype": "float32"})
        else:
            save_adapter(folder, self.adapter, self.lora, self.config)
        write_safetensors(folder / OPTIMIZER_FILE, self.optimizer.state())
        state = {"step": self.step, "args": asdict(self.args), "history": self.history,
                 "lora": None if self.lora is None else asdict(self.lora)}
        write_text(folder / STATE_FILE, json.dumps(state, indent=1) + "\n")
        for name, data in extra_files.items():
            write_bytes(folder / name, data)

    @classmethod
    def resume(cls, folder: Path, weights: dict[str, np.ndarray], config: ModelConfig, train: np.ndarray,
               validation: Optional[np.ndarray], args: TrainingArguments,
               lora: Optional[LoraConfig] = None) -> "Trainer":
        """A run continued from a checkpoint: `weights` loaded from it (or, with `lora`, the frozen
        weights the adapters in it were trained on), the optimizer state and the step from its files.
        Raises Llama3Error when the folder is not a checkpoint of a run with the same arguments
        (the number of steps may grow)."""
        try:
            state = read_json(folder / STATE_FILE, expect=dict)
        except Llama3Error as e:
            raise Llama3Error(f"{folder}: not a llama3_np training checkpoint ({e})") from None
        saved = dict(state.get("args", {}), max_steps=args.max_steps)
        if saved != asdict(args):
            changed = sorted(k for k in saved if saved[k] != asdict(args).get(k))
            raise Llama3Error(f"{folder}: a checkpoint of a run with other settings ({', '.join(changed)}); "
                              "resume with the same settings or train into a new folder")
        if state.get("lora") != (None if lora is None else asdict(lora)):
            raise Llama3Error(f"{folder}: a checkpoint of a run with other LoRA settings ({state.get('lora')}); "
                              "resume with the same settings or train into a new folder")
        optimizer = args.optimizer()
        stored = SafetensorsFile(folder / OPTIMIZER_FILE)
        optimizer.load_state({name: np.array(stored.tensor(name)) for name in stored.names()})
        adapter = None if lora is None else load_adapter(folder, config)[0]
        return cls(weights, config, train, validation, args, optimizer, int(state["step"]), state["history"],
                   lora, adapter)


def trainable(weights: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Writable float32 copies of `weights`, tied embeddings kept as one array."""
    out = {k: np.array(a, dtype=np.float32) for k, a in weights.items()
           if not (k == "output.weight" and config.tie_embeddings)}
    if config.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def scratch_config(shape: str, vocab_size: int) -> ModelConfig:
    """The config of new weights: a preset (`PRESETS`) or a config.json file's shape, with the
    tokenizer's vocabulary. Raises Llama3Error for a file that is not a config or a shape that
    is not a Llama's (heads not dividing the dim or each other, an odd head dim)."""
    if shape in PRESETS:
        keys = PRESETS[shape]
    else:
        try:
            keys = read_json(shape, expect=dict)
        except Llama3Error as e:
            raise Llama3Error(f"shape {shape}: neither a preset ({', '.join(PRESETS)}) nor a readable "
                              f"config.json ({e})") from None
    defaults = {"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True}
    keys = {**defaults, **keys, "vocab_size": vocab_size, "model_type": "llama"}
    try:
        dim, heads = int(keys["hidden_size"]), int(keys["num_attention_heads"])
        kv_heads = int(keys.get("num_key_value_heads", heads))
        head_dim = int(keys.get("head_dim") or dim // max(heads, 1))
        keys["intermediate_size"], keys["num_hidden_layers"]
    except (KeyError, TypeError, ValueError) as e:
        raise Llama3Error(f"shape {shape}: a config needs hidden_size, intermediate_size, "
                          f"num_hidden_layers and num_attention_heads as integers ({e!r})") from None
    problems = []
    if "head_dim" not in keys and (heads < 1 or dim % heads):
        problems.append(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
    if kv_heads < 1 or heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
    if head_dim % 2:
        problems.append(f"head_dim {head_dim} is odd (rope rotates pairs of dims)")
    if problems:
        raise Llama3Error(f"shape {shape}: not a Llama shape: {'; '.join(problems)}")
    return from_hf_config(keys)


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint folders of a run's folder, by step."""
    found = [p for p in out.glob(CHECKPOINT_PREFIX + "*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(trainer: Trainer, out: Path, extra: Mapping[str, bytes] = {}) -> Path:
    """Write the run's checkpoint `out/checkpoint-STEP` (and `out/loss.png`): beside its final name,
    then renamed into place, so that it is never half-written. Returns its folder.
    Raises Llama3Error when it cannot be written."""
    final = out / f"{CHECKPOINT_PREFIX}{trainer.step}"
    try:
        with atomic_folder(final) as folder:
            trainer.save(folder, extra)
    except WriteError as e:
        raise e.advise("free space or choose another folder", what="checkpoint") from None
    plot_losses(trainer.history, out / "loss.png")
    return final


def plot_losses(history: list[dict], path: Path) -> None:
    """The training (and validation) loss by step, drawn when matplotlib (the viz extra) is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="training")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.legend()
    fig.tight_layout()
    with AtomicFile(path) as f:
        fig.savefig(f.file, format="png")
    plt.close(fig)
