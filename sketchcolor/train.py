"""The training loop: per step a D phase then a G phase, each over ``accumulate`` micro-batches.

Under torchrun (``sketchcolor.distributed``) the same loop trains data-parallel: the loss
runs G and D through DistributedDataParallel, ``BatchStream`` gives each rank its share of every
global batch, and rank 0 alone writes files or prints (``is_main``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .checkpoint import atomic_replacement, make_folders, read_checkpoint, sync_folder, write_checkpoint
from .data import make_dataset, tensor_to_pil
from .distributed import (
    any_rank,
    average_across_ranks,
    broadcast_from_main,
    data_parallel_device,
    data_parallel_loss,
    gather_from_ranks,
    is_distributed,
    rank,
    rank_seed,
    skip_gradient_sync,
    wait_for_ranks,
    world_size,
)
from .losses import ColorizationLoss, LossConfig
from .models import SIZE_MULTIPLE, Generator, ModelConfig, PatchDiscriminator, VGGFeatures
from .models.config import ConfigFieldError
from .models.discriminator import min_input_side
from .ops._backends import IMPLS, unavailable_reason
from .ops.correspondence_loss import FWD_OP as CORRESPONDENCE_LOSS_OP
from .ops.scft_attention import FWD_OP as SCFT_ATTENTION_OP
from .output_paths import check_output_folder

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_GLOB = "checkpoint-*.safetensors"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
# Held-out pairs (sample grids, evaluation) come from the same source with this added to the
# seed: other procedural images, other augmentations.
HELD_OUT_SEED_OFFSET = 2**31
SAMPLE_ROWS = 8
# Settings that change neither the weights nor the data of a step: a resumed run may change them
# without saying so. (The model is compared on its own: another one cannot be loaded.)
RUN_SETTINGS = ("out", "resume", "steps", "max_minutes", "device", "workers", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints")


def held_out_seed(seed: int) -> int:
    return seed + HELD_OUT_SEED_OFFSET


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults follow the paper (DESIGN.md, "Model")."""

    data: str | None = field(default=None, metadata={"help": "folder of training images (PNG/JPG/WebP, searched recursively); default: the built-in procedural shapes"})
    size: int = field(default=256, metadata={"help": "side of the square training crops in pixels (a multiple of 16)"})
    dataset_length: int | None = field(default=None, metadata={"help": "items per epoch (default: one per image of --data, 10000 procedural images)"})
    steps: int = field(default=100_000, metadata={"help": "optimizer steps to train for (a resumed run continues up to this many)"})
    batch_size: int = field(default=16, metadata={"help": "images per micro-batch"})
    accumulate: int = field(default=1, metadata={"help": "micro-batches whose gradients are summed per optimizer step"})
    lr_g: float = field(default=1e-4, metadata={"help": "Adam learning rate of the generator"})
    lr_d: float = field(default=2e-4, metadata={"help": "Adam learning rate of the discriminator"})
    beta1: float = field(default=0.5, metadata={"help": "Adam beta1 of both optimizers"})
    beta2: float = field(default=0.999, metadata={"help": "Adam beta2 of both optimizers"})
    seed: int = field(default=0, metadata={"help": "seed of weights, data and every random draw"})
    attn: str = field(default="auto", metadata={"help": "backend of the SCFT attention and correspondence ops", "choices": IMPLS})
    device: str = field(default="auto", metadata={"help": "torch device: auto (cuda when available), cpu, cuda, cuda:1, ..."})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on GPUs of compute capability 8.0 and later (older GPUs and CPUs use float32)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes (0 loads in the training process)"})
    vgg_weights: str | None = field(default=None, metadata={"help": "torchvision-format VGG19 state dict (.pth or .safetensors) for the perceptual and style losses; without it they are off"})
    out: str = field(default="runs/train", metadata={"help": "output folder: checkpoints/, samples/, metrics.jsonl; a run without --resume refuses one that holds checkpoints"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics lines"})
    sample_every: int = field(default=500, metadata={"help": "steps between sample grids (sketch | reference | output | ground truth)"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=3, metadata={"help": "how many of the latest checkpoints to keep"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint to resume from, or 'auto' for the latest in OUT/checkpoints (none there: start fresh); the command line's settings apply from there on, and the run lists those that differ from the checkpoint's"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop (with a checkpoint) once training has run this long"})
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        for name in ("size", "steps", "batch_size", "accumulate", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigFieldError(name, f"must be a positive int, got {value!r}")
        if self.size % SIZE_MULTIPLE:
            raise ConfigFieldError("size", f"must be a multiple of {SIZE_MULTIPLE} (the encoders downsample {SIZE_MULTIPLE}x), got {self.size}")
        if self.dataset_length is not None and not (
            isinstance(self.dataset_length, int) and not isinstance(self.dataset_length, bool) and self.dataset_length >= 1
        ):
            raise ConfigFieldError("dataset_length", f"must be None or a positive int, got {self.dataset_length!r}")
        for name in ("seed", "workers"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ConfigFieldError(name, f"must be a non-negative int, got {value!r}")
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
                raise ConfigFieldError(name, f"must be a finite positive number, got {value!r}")
        for name in ("beta1", "beta2"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 <= getattr(self, name) < 1):
                raise ConfigFieldError(name, f"must be in [0, 1), got {getattr(self, name)!r}")
        if self.attn not in IMPLS:
            raise ConfigFieldError("attn", f"must be one of {IMPLS}, got {self.attn!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigFieldError("max_minutes", f"must be positive, got {self.max_minutes!r}")
        if not isinstance(self.model, ModelConfig) or not isinstance(self.loss, LossConfig):
            raise ValueError("model must be a ModelConfig and loss a LossConfig")
        smallest_side = min_input_side(self.model)
        if self.size < smallest_side:
            smallest_size = -(-smallest_side // SIZE_MULTIPLE) * SIZE_MULTIPLE
            raise ValueError(
                f"size {self.size} is too small for disc_layers={self.model.disc_layers}: the discriminator's convs need "
                f"images of at least {smallest_side}x{smallest_side}; the smallest size is {smallest_size} (or use fewer disc_layers)"
            )
        if self.batch_size * (self.size // SIZE_MULTIPLE) ** 2 < 2:
            raise ValueError(
                f"size {self.size} with batch_size {self.batch_size}: the encoders' 1x1 deepest features would give batch "
                "norm one value per channel; use a larger size or batch_size"
            )
        if self.loss.negatives == "sampled" and self.model.feature_grid(self.size) ** 2 < 2:
            raise ValueError(
                f"size {self.size} at scft_stride {self.model.scft_stride} leaves one reference cell: sampled negatives "
                "need at least 2 (use a larger size or a smaller scft_stride)"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"train config has unknown fields {sorted(unknown)}")
        values["model"] = ModelConfig.from_dict(values.get("model", {}))
        values["loss"] = LossConfig(**values.get("loss", {}))
        return cls(**values)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is not a torch device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def use_bf16_autocast(amp: bool, device: torch.device, say) -> bool:
    """Whether --amp's bf16 autocast runs on ``device``: GPUs with bf16 tensor cores (compute
    capability 8.0 and later) only. Older GPUs (T4, V100) have no bf16 tensor-core instructions,
    so autocast would only add casts around float32-speed products: those train in float32, and
    the run says so."""
    if not amp or device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        say(f"--amp: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bfloat16 "
            "tensor cores; training in float32")
        return False
    return True


def check_attn(attn: str, device: torch.device, op_dtypes: dict[str, torch.dtype]) -> None:
    """Raise ValueError naming ``attn`` if that backend cannot run each op of ``op_dtypes`` (C++
    schema name -> the dtype it will see) on ``device``: up front, instead of at the first
    forward pass, deep inside a run. auto falls back to reference, which runs everywhere."""
    if attn not in IMPLS:
        raise ValueError(f"attn must be one of {IMPLS}, got {attn!r}")
    if attn in ("auto", "reference"):
        return
    for op_name, dtype in op_dtypes.items():
        reason = unavailable_reason(attn, device, op_name, dtype)
        if reason is not None:
            raise ValueError(f"attn={attn!r}: {reason}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- model, optimizers, loss -------------------------------------------------------------------


def build_models(config: TrainConfig, device: torch.device) -> tuple[Generator, PatchDiscriminator]:
    """Fresh generator and discriminator (weights drawn from torch's global generator)."""
    generator = Generator(config.model, attn_impl=config.attn).to(device)
    discriminator = PatchDiscriminator(config.model).to(device)
    return generator, discriminator


def build_optimizers(config: TrainConfig, generator: Generator, discriminator: PatchDiscriminator) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    betas = (config.beta1, config.beta2)
    return (
        torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=betas),
        torch.optim.Adam(discriminator.parameters(), lr=config.lr_d, betas=betas),
    )


def build_loss(config: TrainConfig, generator: Generator, discriminator: PatchDiscriminator, device: torch.device, say) -> ColorizationLoss:
    """The loss; without VGG weights the perceptual and style terms are off, said once via ``say``."""
    vgg = None
    if config.vgg_weights is not None:
        vgg = VGGFeatures.from_file(config.vgg_weights).to(device)
    elif config.loss.perceptual_weight or config.loss.style_weight:
        say("no --vgg-weights given: the perceptual and style losses are off")
    return ColorizationLoss(generator, discriminator, config.loss, vgg, attn_impl=config.attn)


# --- data order --------------------------------------------------------------------------------


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; workers keep serving so the main process can
    # finish its step and save (see _InterruptFlag). Workers usually start ignoring it already
    # (_workers_start_ignoring_interrupts); this covers loaders started off the main thread.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _workers_start_ignoring_interrupts():
    """Starts DataLoader workers with SIGINT ignored from their first instruction. A worker
    started by spawn or forkserver (macOS; Linux from Python 3.14) otherwise imports torch under
    Python's default SIGINT handler for seconds before ``_ignore_interrupts`` runs, and a Ctrl-C
    then kills it and the run with it, unsaved. An ignored signal stays ignored across fork and
    exec, and Python keeps it so; the forkserver, which the first loader starts, passes it on.
    Meanwhile this process holds a Ctrl-C back (blocked, pending) rather than dropping it, unless
    multiprocessing's resource tracker starts in the block and unblocks SIGINT on its way out:
    then one pressed during those milliseconds is lost, and the next stops the run as usual."""
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread may set handlers; its Ctrl-C handling is the one that matters.
        yield
        return
    masked = hasattr(signal, "pthread_sigmask")
    if masked:
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    # Set after blocking: setting SIG_IGN discards a pending SIGINT, restoring the handler does not.
    previous_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


class BatchStream:
    """Endless micro-batches, epoch after epoch, whose position (epoch, items used in it) is
    resumable: the order is a function of (seed, epoch) and the items of (seed, epoch, index).

    With ``world_size`` ranks, rank ``rank`` gets every ``world_size``-th item of the epoch's
    order (DistributedSampler), so the ranks' micro-batches together are the items a single
    process with batch ``world_size * batch_size`` would take; the single process is the
    ``world_size == 1`` case of the same sampler."""

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, workers: int, pin_memory: bool = False, rank: int = 0, world_size: int = 1
    ) -> None:
        if len(dataset) // world_size < batch_size:
            split = f" split over {world_size} ranks" if world_size > 1 else ""
            raise ValueError(f"batch_size ({batch_size}) is larger than the dataset ({len(dataset)} items{split})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.workers, self.pin_memory = workers, pin_memory
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0  # position: items of the epoch this rank has used
        self._batches = None

    def state(self) -> dict:
        """The epoch, and the items of it all ranks together have used."""
        return {"epoch": self.epoch, "position": self.position * self.world_size}

    def load_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        # Resumed with another world size, the ranks continue at the next multiple of it:
        # at most world_size - 1 items of this epoch are skipped.
        self.position = -(-int(state["position"]) // self.world_size)
        self._batches = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self._batches is None:
                self.dataset.set_epoch(self.epoch)
                # drop_last: every rank gets as many items, so every rank takes as many steps.
                sampler = DistributedSampler(self.dataset, self.world_size, self.rank, shuffle=True, seed=self.seed, drop_last=True)
                sampler.set_epoch(self.epoch)
                order = list(sampler)[self.position :]
                loader = DataLoader(
                    self.dataset,
                    batch_size=self.batch_size,
                    sampler=order,
                    drop_last=True,
                    num_workers=self.workers,
                    pin_memory=self.pin_memory,
                    worker_init_fn=_ignore_interrupts if self.workers else None,
                    # Its own generator: otherwise each new iterator draws a worker seed from
                    # torch's global generator, and a resumed run would draw different negatives.
                    generator=torch.Generator().manual_seed(self.seed),
                )
                with _workers_start_ignoring_interrupts():
                    self._batches = iter(loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self.epoch, self.position, self._batches = self.epoch + 1, 0, None
                continue
            self.position += self.batch_size
            return batch


# --- one step ----------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """A loss or its gradients were NaN or infinite; the run stopped after saving its last good state."""


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    # The G phase backpropagates through D; D's weights need no gradients there.
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def _accumulate(totals: dict[str, torch.Tensor], terms: dict[str, torch.Tensor], count: int) -> None:
    for name, value in terms.items():
        totals[name] = totals.get(name, 0) + value.float() / count


def train_step(
    loss: ColorizationLoss,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    autocast,
) -> dict[str, torch.Tensor]:
    """One D step then one G step on the same micro-batches; returns the loss terms averaged over
    the micro-batches (and, data-parallel, over the ranks).

    Raises NonFiniteLossError (before that phase's optimizer step) if a phase's loss or gradients
    are not finite; both checks are on the ranks' averages, so every rank raises or none does.
    """
    count = len(micro_batches)

    # D step
    d_terms: dict[str, torch.Tensor] = {}
    optimizer_d.zero_grad(set_to_none=True)
    for index, batch in enumerate(micro_batches):
        with skip_gradient_sync(loss.discriminator, skip=index < count - 1):
            with autocast():
                value, parts = loss.run_D(batch)
            (value / count).backward()
        _accumulate(d_terms, {"D/loss": value.detach(), **parts}, count)
    d_terms = average_across_ranks(d_terms)
    if not torch.isfinite(d_terms["D/loss"]):
        raise NonFiniteLossError(f"non-finite discriminator loss ({_format(d_terms)})")
    _check_gradients(optimizer_d, "discriminator", d_terms)
    optimizer_d.step()

    # G step
    g_terms: dict[str, torch.Tensor] = {}
    optimizer_g.zero_grad(set_to_none=True)
    loss.weigh_micro_batches(micro_batches)
    with _frozen(loss.discriminator), skip_gradient_sync(loss.discriminator):
        for index, batch in enumerate(micro_batches):
            with skip_gradient_sync(loss.generator, skip=index < count - 1):
                with autocast():
                    value, parts = loss.run_G(batch)
                (value / count).backward()
            _accumulate(g_terms, {"G/loss": value.detach(), **parts}, count)
    g_terms = average_across_ranks(g_terms)
    terms = {**d_terms, **g_terms}
    if not torch.isfinite(g_terms["G/loss"]):
        raise NonFiniteLossError(f"non-finite generator loss ({_format(terms)})")
    _check_gradients(optimizer_g, "generator", terms)
    optimizer_g.step()
    return terms


def _check_gradients(optimizer: torch.optim.Optimizer, network: str, terms: dict[str, torch.Tensor]) -> None:
    """Raise NonFiniteLossError if a gradient of ``optimizer``'s parameters is NaN or infinite.

    A finite loss can have them (an overflow in the backward pass), and the optimizer step would
    write them into the weights, which the next step's failure would then save as the last good
    state. One fused reduction per phase: the largest magnitude (the inf-norm, which unlike a sum
    of squares cannot overflow on finite values) is finite only if every entry is. Data-parallel,
    the gradients are the ranks' average once the last micro-batch is back, so every rank decides
    alike."""
    gradients = [parameter.grad for group in optimizer.param_groups for parameter in group["params"] if parameter.grad is not None]
    if not torch.isfinite(torch.nn.utils.get_total_norm(gradients, norm_type=math.inf)):
        raise NonFiniteLossError(f"non-finite {network} gradients; the loss is finite ({_format(terms)})")


def _format(terms: dict[str, torch.Tensor | float]) -> str:
    return ", ".join(f"{name} {float(value):.4g}" for name, value in terms.items())


# --- RNG and checkpoints -----------------------------------------------------------------------


def capture_rng() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": random.getstate(),
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # One state per GPU the saving process saw; a machine with fewer restores theirs only
        # (set_rng_state_all would index past its devices). Training draws nothing from them.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])


@dataclass
class Trainer:
    """The objects a run mutates; what a checkpoint saves and restores."""

    config: TrainConfig
    generator: Generator
    discriminator: PatchDiscriminator
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    stream: BatchStream
    step: int = 0


def checkpoint_state(trainer: Trainer, rng: dict | None = None, data: dict | None = None) -> dict:
    """Everything needed to continue exactly; ``rng`` and ``data`` default to their current values.

    Data-parallel, every rank must call it: it gathers each rank's ``rng`` into "rng_by_rank"
    (and "rng", this rank's, is rank 0's in the file, which rank 0 writes)."""
    rng = capture_rng() if rng is None else rng
    state = {
        "step": trainer.step,
        "config": trainer.config.to_dict(),
        "model": trainer.config.model.to_dict(),
        "generator": trainer.generator.state_dict(),
        "discriminator": trainer.discriminator.state_dict(),
        "optimizer_g": trainer.optimizer_g.state_dict(),
        "optimizer_d": trainer.optimizer_d.state_dict(),
        "data": trainer.stream.state() if data is None else data,
        "rng": rng,
    }
    if world_size() > 1:
        state["rng_by_rank"] = gather_from_ranks(rng)
    return state


def changed_settings(saved: dict, config: TrainConfig) -> dict[str, tuple]:
    """The settings that change the result (all but RUN_SETTINGS and the model) whose value in
    ``saved`` (a checkpoint's config, a dict) differs from ``config``'s: name ("loss.<name>" for
    the loss's) -> (saved, now)."""

    def flat(values: dict) -> dict:
        settings = {name: value for name, value in values.items() if name not in (*RUN_SETTINGS, "model", "loss")}
        settings.update({f"loss.{name}": value for name, value in values.get("loss", {}).items()})
        return settings

    saved, now = flat(saved), flat(config.to_dict())
    return {name: (saved.get(name), value) for name, value in now.items() if saved.get(name) != value}


def restore_checkpoint(trainer: Trainer, path: str | Path) -> dict[str, tuple]:
    """Load models, optimizers, step, data position and RNG states from ``path``: this rank's RNG
    state when the checkpoint was saved by as many ranks, else a fresh per-rank seed. The
    optimizers take the learning rates and betas of the trainer's config, not the saved ones.
    Returns the settings that differ from the checkpoint's (``changed_settings``)."""
    state = read_checkpoint(path)
    try:
        saved_model = ModelConfig.from_dict(state["model"])
        changed = changed_settings(state["config"], trainer.config)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"resume: checkpoint {str(path)!r} is damaged: its configs do not load ({type(error).__name__}: {error})") from error
    if saved_model != trainer.config.model:
        differences = {
            name: (getattr(saved_model, name), getattr(trainer.config.model, name))
            for name in saved_model.to_dict()
            if getattr(saved_model, name) != getattr(trainer.config.model, name)
        }
        raise ValueError(f"resume: checkpoint {str(path)!r} has another model config (saved, asked): {differences}")
    device = next(trainer.generator.parameters()).device
    try:
        trainer.generator.load_state_dict(state["generator"])
        trainer.discriminator.load_state_dict(state["discriminator"])
        trainer.optimizer_g.load_state_dict(state["optimizer_g"])
        trainer.optimizer_d.load_state_dict(state["optimizer_d"])
        trainer.stream.load_state(state["data"])
        step = int(state["step"])
        rng_by_rank = state.get("rng_by_rank", [state["rng"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        # RuntimeError: load_state_dict's missing or unexpected keys and shape mismatches.
        raise ValueError(f"resume: checkpoint {str(path)!r} does not load into this run ({type(error).__name__}: {error})") from error
    trainer.generator.to(device)
    trainer.discriminator.to(device)
    betas = (trainer.config.beta1, trainer.config.beta2)
    for optimizer, lr in ((trainer.optimizer_g, trainer.config.lr_g), (trainer.optimizer_d, trainer.config.lr_d)):
        for group in optimizer.param_groups:
            # load_state_dict brought back the saved ones; the command line's apply from here on.
            group.update(lr=lr, betas=betas)
    trainer.step = step
    if len(rng_by_rank) == world_size():
        restore_rng(rng_by_rank[rank()])
    else:
        seed_everything(rank_seed(trainer.config.seed, rank(), trainer.step))
        # batch_size is per process: the global batch changes with the number of processes.
        changed["world_size"] = (len(rng_by_rank), world_size())
    return changed


def checkpoint_path(out: Path, step: int) -> Path:
    return out / CHECKPOINT_DIR / f"checkpoint-{step:08d}.safetensors"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoints under OUT/checkpoints, oldest first."""
    return sorted((Path(out) / CHECKPOINT_DIR).glob(CHECKPOINT_GLOB))


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a file; for a run folder, its latest checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
        raise FileNotFoundError(f"checkpoint: the folder {str(path)!r} has no {CHECKPOINT_DIR}/{CHECKPOINT_GLOB}")
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint_path."""
    return int(path.stem.removeprefix("checkpoint-"))


def set_aside_later_checkpoints(out: Path, step: int) -> Path | None:
    """Moves the checkpoints of steps after ``step`` in OUT/checkpoints (a run resumed from an
    earlier one of its own replaces them) into a new folder OUT/checkpoints/superseded-<step>[-n],
    and returns it; None if there are none. Left in place, they would be the latest checkpoint for
    ``--resume auto``, colorize and eval, and pruning would delete the new run's first."""
    later = [path for path in list_checkpoints(out) if checkpoint_step(path) > step]
    if not later:
        return None
    folder = out / CHECKPOINT_DIR / f"superseded-{step:08d}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = out / CHECKPOINT_DIR / f"superseded-{step:08d}-{suffix}"
    folder.mkdir()
    for path in later:
        path.rename(folder / path.name)
    # Before the run writes checkpoints of its own: a power loss that undid the moves would
    # bring back the abandoned run's later checkpoints beside them.
    sync_folder(folder)
    sync_folder(folder.parent)
    return folder


def save_checkpoint(trainer: Trainer, out: Path, state: dict | None = None) -> Path:
    """Write the trainer's state (or ``state``) as OUT/checkpoints/checkpoint-<step>.safetensors
    and delete all but the ``keep_checkpoints`` latest."""
    path = checkpoint_path(out, trainer.step)
    make_folders(path.parent)
    write_checkpoint(path, checkpoint_state(trainer) if state is None else state)
    for old in list_checkpoints(out)[: -trainer.config.keep_checkpoints]:
        old.unlink()
    return path


@dataclass
class StepStart:
    """What a step changes before its last check, as it was when the step began. Restoring it
    after a non-finite G loss gives back the last good state: the D step of the failed step is
    undone, and G's normalization statistics (updated by its forward passes) are reset."""

    generator_buffers: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor]
    optimizer_d: dict
    data: dict
    rng: dict

    @classmethod
    def capture(cls, trainer: Trainer) -> StepStart:
        return cls(
            {name: buffer.clone() for name, buffer in trainer.generator.named_buffers()},
            {name: value.clone() for name, value in trainer.discriminator.state_dict().items()},
            copy.deepcopy(trainer.optimizer_d.state_dict()),
            trainer.stream.state(),
            capture_rng(),
        )

    def restore(self, trainer: Trainer) -> None:
        with torch.no_grad():
            for name, buffer in trainer.generator.named_buffers():
                buffer.copy_(self.generator_buffers[name])
        trainer.discriminator.load_state_dict(self.discriminator)
        trainer.optimizer_d.load_state_dict(self.optimizer_d)


# --- outputs -----------------------------------------------------------------------------------


def sample_grid(generator: Generator, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows of sketch | reference | output | ground truth, as one (3, H, W) image in [0, 1]."""
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        output = generator(batch["sketch"], batch["reference"]).image.float()
    generator.train(was_training)
    columns = [batch["sketch"].expand(-1, 3, -1, -1), batch["reference"], output, batch["ground_truth"]]
    padded = [torch.nn.functional.pad((image.float().cpu() + 1) / 2, (1, 1, 1, 1), value=1.0) for image in columns]
    rows = torch.cat(padded, dim=3)
    return torch.cat(list(rows), dim=1)


def _logged_step(line: str) -> int | None:
    """The step of a metrics line, or None for one that is not a whole metrics line."""
    if not line.endswith("\n"):
        return None
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = entry.get("step") if isinstance(entry, dict) else None
    return step if isinstance(step, int) else None


def _drop_metrics_after(path: Path, step: int) -> None:
    """Rewrite the metrics file ``path``, if there is one, without the lines of steps after
    ``step`` and without torn lines (a write the process died in). It happens atomically: a crash
    meanwhile leaves the old file."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
    if kept == lines:
        return
    with atomic_replacement(path) as temporary:
        temporary.write_text("".join(kept), encoding="utf-8")


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl, and to TensorBoard when installed.

    The file continues from the run's current ``step``: lines of later steps were logged after the
    checkpoint the run resumed from (by a run that crashed or was killed before its next one), and
    the resumed run logs those steps again; a fresh run (step 0) starts an empty file."""

    def __init__(self, out: Path, step: int) -> None:
        self.path = out / METRICS_FILE
        _drop_metrics_after(self.path, step)
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._tensorboard = None
        else:
            # Like metrics.jsonl, drops the events of later steps that a resumed run logs again.
            self._tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class _InterruptFlag:
    """Turns the first Ctrl-C into a request to stop after the current step (which then saves a
    checkpoint); one during the final save lets it finish. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class TrainResult:
    out: Path
    step: int
    checkpoint: Path | None
    stopped_early: str | None
    """Why the run ended before config.steps ("interrupted", "time limit"), else None."""


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def _sample_batch(config: TrainConfig, feature_grid: int, device: torch.device) -> dict[str, torch.Tensor]:
    """SAMPLE_ROWS held-out pairs for the sample grids (for a folder: its images, other augmentations)."""
    held_out = make_dataset(config.data, config.size, feature_grid, held_out_seed(config.seed), SAMPLE_ROWS)
    rows = [held_out[index] for index in range(SAMPLE_ROWS)]
    return _to_device({name: torch.stack([row[name] for row in rows]) for name in rows[0]}, device)


def _progress_postfix(terms: dict[str, torch.Tensor]) -> dict[str, str]:
    shown = {"D/loss": "D", "G/loss": "G", "G/l1": "l1", "G/correspondence": "corr", "SCFT/within_one": "match"}
    return {label: f"{float(terms[name]):.3g}" for name, label in shown.items() if name in terms}


def train(config: TrainConfig, *, is_main: bool = True) -> TrainResult:
    """Train (or resume) a run; returns where it ended. Raises NonFiniteLossError after saving
    the last good state when a loss is not finite. Inside a process group (torchrun, see
    ``sketchcolor.distributed``) it trains data-parallel, and only rank 0 is the main process."""
    out = Path(config.out)
    check_output_folder("out", out, ())
    is_main = is_main and rank() == 0
    say = tqdm.write if is_main else (lambda message: None)
    device = data_parallel_device(config.device) if is_distributed() else resolve_device(config.device)
    use_bf16 = use_bf16_autocast(config.amp, device, say)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    # Under autocast both ops get bfloat16 q and k (the correspondence loss scores them in float32
    # on every backend).
    attention_dtype = torch.bfloat16 if use_bf16 else torch.float32
    check_attn(config.attn, device, {SCFT_ATTENTION_OP: attention_dtype, CORRESPONDENCE_LOSS_OP: attention_dtype})
    existing = list_checkpoints(out)
    # Every rank goes by what rank 0 found (a rank's own listing may lag or differ).
    latest = broadcast_from_main(str(existing[-1]) if existing else None)
    continues_out = config.resume == "auto" or (
        config.resume is not None and Path(config.resume).resolve().parent == (out / CHECKPOINT_DIR).resolve()
    )
    if latest is not None and not continues_out:
        # A second run would mix its checkpoints and metrics with the first one's, and pruning by
        # step number could delete its own newer work.
        raise ValueError(
            f"out {str(out)!r} already holds the checkpoints of a run (the latest: {latest}); pass --resume auto to "
            "continue that run, or choose another --out"
        )

    seed_everything(config.seed)  # the same initial weights on every rank
    generator, discriminator = build_models(config, device)
    optimizer_g, optimizer_d = build_optimizers(config, generator, discriminator)
    loss = build_loss(config, generator, discriminator, device, say)
    if is_distributed():
        loss = data_parallel_loss(loss, device)
    # From here on each rank draws its own random numbers (the sampled negatives).
    seed_everything(rank_seed(config.seed, rank(), 0))
    feature_grid = config.model.feature_grid(config.size)
    dataset = make_dataset(config.data, config.size, feature_grid, config.seed, config.dataset_length)
    stream = BatchStream(
        dataset, config.batch_size, config.seed, config.workers, pin_memory=device.type == "cuda", rank=rank(), world_size=world_size()
    )
    trainer = Trainer(config, generator, discriminator, optimizer_g, optimizer_d, stream)

    resume = latest if config.resume == "auto" else config.resume
    if resume is not None:
        try:
            changed = restore_checkpoint(trainer, resume)
        except ValueError as error:
            older = existing[:-1] if config.resume == "auto" else []
            if older:
                raise ValueError(f"{error}; to continue from the checkpoint before it instead, pass --resume {older[-1]}") from error
            raise
        say(f"resumed from {resume} at step {trainer.step}")
        if trainer.step >= config.steps:
            say(f"step {trainer.step} already reaches steps = {config.steps}: nothing to train")
        if is_main and continues_out:
            superseded = set_aside_later_checkpoints(out, trainer.step)
            if superseded is not None:
                say(f"moved the checkpoints after step {trainer.step}, which this run replaces, to {superseded}")
        if changed:
            say("settings changed since the checkpoint (saved -> now): " + ", ".join(f"{name} {saved} -> {now}" for name, (saved, now) in changed.items()))

    sample_batch = _sample_batch(config, feature_grid, device) if is_main else None
    metrics = None
    if is_main:
        # The run's folder too, whose entry the first checkpoint's durability rests on.
        make_folders(out / SAMPLES_DIR)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        metrics = MetricsLog(out, trainer.step)

    def write_samples() -> None:
        tensor_to_pil(sample_grid(generator, sample_batch)).save(out / SAMPLES_DIR / f"step-{trainer.step:08d}.png")

    def save(state: dict) -> Path:
        # On every rank (checkpoint_state gathers from all of them); rank 0 writes the file, and
        # no rank returns before it is written: after a non-finite loss every rank goes on to exit,
        # and torchrun stops the rest of the job, rank 0 included, when the first one has.
        if is_main:
            save_checkpoint(trainer, out, state)
        wait_for_ranks()
        return checkpoint_path(out, trainer.step)

    generator.train()
    discriminator.train()
    started = last_log_time = time.monotonic()
    last_log_step = trainer.step
    # A resumed run's checkpoint is the one it resumed from until it saves another: resumed in its
    # own folder with no step left to take, it does not write the same state again.
    checkpoint, stopped_early = None if resume is None else Path(resume), None
    progress = tqdm(total=config.steps, initial=trainer.step, desc="train", unit="step", disable=not is_main, dynamic_ncols=True)
    try:
        with _InterruptFlag() as interrupt:
            while trainer.step < config.steps:
                start = StepStart.capture(trainer)
                micro_batches = [_to_device(next(stream), device) for _ in range(config.accumulate)]
                try:
                    terms = train_step(loss, micro_batches, optimizer_g, optimizer_d, autocast)
                except NonFiniteLossError as error:
                    start.restore(trainer)
                    checkpoint = save(checkpoint_state(trainer, rng=start.rng, data=start.data))
                    raise NonFiniteLossError(
                        f"step {trainer.step + 1}: {error}; stopped, the last good state (step {trainer.step}) is in {checkpoint}"
                    ) from None
                trainer.step += 1
                progress.update(1)
                last = trainer.step == config.steps

                if trainer.step % config.log_every == 0 or last:
                    now = time.monotonic()
                    images = (trainer.step - last_log_step) * config.batch_size * config.accumulate * world_size()
                    values = {name: float(value) for name, value in terms.items()}
                    values.update(epoch=stream.epoch, seconds=now - started, images_per_second=images / max(now - last_log_time, 1e-9))
                    last_log_time, last_log_step = now, trainer.step
                    progress.set_postfix(_progress_postfix(terms))
                    if metrics is not None:
                        metrics.write(trainer.step, values)
                if is_main and (trainer.step % config.sample_every == 0 or last):
                    write_samples()
                if trainer.step % config.checkpoint_every == 0:
                    checkpoint = save(checkpoint_state(trainer))

                # Decided together: a rank that went on alone would wait in its next collective forever.
                interrupted, out_of_time = any_rank(
                    interrupt.requested, config.max_minutes is not None and time.monotonic() - started >= 60 * config.max_minutes
                )
                if interrupted:
                    stopped_early = "interrupted"
                elif out_of_time:
                    stopped_early = "time limit"
                if stopped_early:
                    break

            # Still under the interrupt flag: a Ctrl-C now must not cost the steps since the last checkpoint.
            if is_main and stopped_early:
                write_samples()
            if checkpoint != checkpoint_path(out, trainer.step):
                checkpoint = save(checkpoint_state(trainer))
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()

    if stopped_early:
        say(f"stopped at step {trainer.step} ({stopped_early}); checkpoint: {checkpoint}")
    return TrainResult(out, trainer.step, checkpoint, stopped_early)


def demo_config(out: str) -> TrainConfig:
    """A run of minutes on 2 CPU cores: the built-in shapes at 64x64, networks a quarter of the
    paper's width (D = 248) with one residual block, SCFT at 1/4 of the side (a 16x16 grid, so
    colors are looked up per 4x4 cell), small batches and higher learning rates so that the
    reference's colors reach the output within the time. The loss is LossConfig's default: the
    paper's weights, with the lsgan adversarial objective."""
    return TrainConfig(
        size=64,
        dataset_length=4000,
        steps=800,
        batch_size=8,
        lr_g=1e-3,
        lr_d=5e-4,
        seed=0,
        workers=1,
        out=out,
        log_every=10,
        sample_every=100,
        checkpoint_every=200,
        keep_checkpoints=1,
        # About 7 minutes for the 800 steps on 2 idle cores (2026-12-07, an AMD EPYC with AVX2); on
        # a slower or busy machine training stops here instead, so that with the evaluation (about
        # 15 s) the demo stays under 10 minutes.
        max_minutes=9.0,
        model=ModelConfig(width=4, scft_stride=4, residual_blocks=1, disc_width=16),
        loss=LossConfig(),
    )


def replace_config(config: TrainConfig, **changes) -> TrainConfig:
    """``config`` with top-level fields changed; ``model`` and ``loss`` may be dicts of changes."""
    for name in ("model", "loss"):
        if isinstance(changes.get(name), dict):
            changes[name] = replace(getattr(config, name), **changes[name])
    return replace(config, **changes)


__all__ = [
    "BatchStream",
    "NonFiniteLossError",
    "StepStart",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_loss",
    "build_models",
    "build_optimizers",
    "changed_settings",
    "check_attn",
    "checkpoint_state",
    "demo_config",
    "find_checkpoint",
    "held_out_seed",
    "list_checkpoints",
    "replace_config",
    "restore_checkpoint",
    "sample_grid",
    "save_checkpoint",
    "seed_everything",
    "train",
    "train_step",
]
