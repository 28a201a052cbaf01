"""Data-parallel training over processes started by torchrun, on PyTorch's own engine.

One process per GPU (or CPU process), a process group from torchrun's environment (nccl on
GPUs, gloo on CPUs), DistributedDataParallel for G and D, a DistributedSampler per rank
(``BatchStream``), and the few collectives the training loop needs: metrics averaged across
ranks, stop decisions every rank agrees on, per-rank RNG states gathered for the checkpoint.

What makes W ranks with per-rank batch b train like one process with batch W * b:
- the global batch is the same items: the sampler splits one epoch permutation over the ranks;
- batch norm uses the statistics of the global batch (``torch.nn.SyncBatchNorm`` on GPUs,
  ``CPUSyncBatchNorm`` on CPUs, where torch's has no kernels);
- every loss is a mean over the global batch: DDP averages gradients over ranks, which turns
  per-rank means of equal-size batches into the global mean; the correspondence loss, a mean
  over a data-dependent number of valid terms, is reweighted by the ranks' term counts
  (``DataParallelLoss``);
- spectral norm's power iteration depends only on the weights and its own vectors, so every
  rank (and the single process) computes the same normalized weights; batch norm's running
  statistics are global-batch ones on every rank. DDP's buffer broadcast from rank 0
  (``broadcast_buffers``, before each forward that follows a gradient-averaging one) only
  guards against drift, e.g. between GPUs that round differently.
Random draws (the sampled triplet negatives) come from a per-rank seed (``rank_seed``), so ranks
draw independent negatives; they differ from a single process's draws.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import torch.distributed as dist
# Differentiable all_reduce (its backward all-reduces the gradient); the public
# torch.distributed.nn.functional.all_reduce is deprecated in its favour.
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .losses import ColorizationLoss

# The env:// rendezvous variables torchrun sets for every process, and the per-node rank that
# picks the GPU.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_COMMAND = "torchrun --nproc_per_node=N -m sketchcolor train ..."


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def data_parallel_device(name: str) -> torch.device:
    """This process's device under torchrun: ``cuda:LOCAL_RANK`` for ``name`` "cuda" (or "auto"
    with CUDA available), else the CPU."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is not a torch device: {error}") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"data-parallel training runs on cuda or cpu devices, got {name!r}")
    if device.index is not None:
        raise ValueError(f"under torchrun each process uses the GPU of its LOCAL_RANK; give --device cuda (or auto), not {name!r}")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
            "start at most that many processes per node (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device_name: str, required: bool = False):
    """Joins the process group torchrun set up (nccl for GPU devices, gloo for the CPU) for the
    duration of the block, and leaves it afterwards. Outside torchrun it does nothing, or with
    ``required`` raises ValueError saying how to launch."""
    if not launched_by_torchrun():
        if required:
            raise ValueError(f"data-parallel training needs the environment torchrun sets up; launch with: {TORCHRUN_COMMAND}")
        yield
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} are not; launch with: {TORCHRUN_COMMAND}")
    device = data_parallel_device(device_name)
    if device.type == "cuda":
        # Before the group exists: nccl binds each rank's communicator to its current device.
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        # Ranks leave together: tearing gloo down while a peer still has a collective in flight
        # aborts that peer ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's random draws from ``step`` on: a function of (seed, rank, step),
    so that ranks draw independent streams."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


# --- collectives (each one a no-op outside a process group) -----------------------------------


def _collective_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_across_ranks(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every scalar in ``terms`` averaged over the ranks (one all_reduce); every rank must pass
    the same names in the same order."""
    if not is_distributed() or not terms:
        return terms
    values = torch.stack([value.detach().float().to(_collective_device()) for value in terms.values()])
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(terms, values.unbind()))


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any rank: decisions every rank must take together."""
    if not is_distributed():
        return flags
    values = torch.tensor(flags, dtype=torch.int32, device=_collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in values.tolist())


def gather_from_ranks(value) -> list:
    """``value`` of every rank (picklable), indexed by rank."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def wait_for_ranks() -> None:
    """Returns once every rank has called it (a barrier)."""
    if is_distributed():
        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's ``value`` (picklable), on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# --- models ------------------------------------------------------------------------------------


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """``torch.nn.SyncBatchNorm`` for CPU tensors, which torch's does not support (it has no CPU
    kernels): in training with more than one rank, normalizes by the mean and variance of the
    global batch, every rank's items together, and updates the running statistics with them.

    The statistics are summed with a differentiable all_reduce, whose backward sums the gradients
    of the statistics over the ranks; with DDP's average of the parameter gradients this is the
    gradient of the global batch's loss, as with SyncBatchNorm. Two reductions (sums, then the
    sum of squared deviations) keep the variance accurate. In eval mode, or alone, it is
    ``nn.BatchNorm2d``; its state dict is BatchNorm2d's.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = (0, 2, 3)
        local_count = input.new_tensor([input.numel() // input.shape[1]])
        totals = funcol.all_reduce(torch.cat([input.sum(dims), local_count]), "sum", dist.group.WORLD)
        count = totals[-1]
        mean = totals[:-1] / count
        centered = input - mean.view(1, -1, 1, 1)
        variance = funcol.all_reduce(centered.square().sum(dims), "sum", dist.group.WORLD) / count
        output = centered * torch.rsqrt(variance + self.eps).view(1, -1, 1, 1)
        if self.affine:
            output = output * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                # Like BatchNorm2d: the running variance is the unbiased one.
                self.running_var.lerp_(variance * (count / (count - 1)), momentum)
        return output

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every BatchNorm2d replaced by a CPUSyncBatchNorm holding the same
        parameter and buffer objects (optimizers built on ``module`` keep working)."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            if module.track_running_stats:
                converted.running_mean, converted.running_var = module.running_mean, module.running_var
                converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its batch norms computing global-batch statistics across ranks."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return CPUSyncBatchNorm.convert(module)


class DataParallelLoss(ColorizationLoss):
    """``loss`` whose forward passes go through the DDP wrappers of its generator and
    discriminator (so their hooks average the gradients across ranks), and whose correspondence
    term is weighted so that the ranks' average is the global batch's mean: its term counts are
    summed over the ranks (``ColorizationLoss.weigh_micro_batches``)."""

    def __init__(self, loss: ColorizationLoss, generator: DistributedDataParallel, discriminator: DistributedDataParallel) -> None:
        super().__init__(loss.generator, loss.discriminator, loss.config, loss.vgg, loss.attn_impl)
        self.generator, self.discriminator = generator, discriminator

    def _step_totals(self, count: torch.Tensor, parts: int) -> tuple[torch.Tensor, int]:
        total = count.clone()
        dist.all_reduce(total)
        return total, parts * dist.get_world_size()


def data_parallel_loss(loss: ColorizationLoss, device: torch.device) -> DataParallelLoss:
    """Makes ``loss``'s generator use global-batch batch norm (in place), wraps G and D in
    DistributedDataParallel (which broadcasts rank 0's weights and buffers now), and returns
    the loss that trains through the wrappers. Checkpoints and
    sample grids keep using the unwrapped modules: their state dicts are the single-process ones."""
    sync_batch_norm(loss.generator, device)
    device_ids = [device.index] if device.type == "cuda" else None
    return DataParallelLoss(
        loss,
        DistributedDataParallel(loss.generator, device_ids=device_ids),
        DistributedDataParallel(loss.discriminator, device_ids=device_ids),
    )


def skip_gradient_sync(module: nn.Module, skip: bool = True):
    """DDP's ``no_sync`` when ``skip`` and ``module`` is a DDP wrapper, else nothing.

    For every micro-batch of an accumulated step but the last (gradients are averaged once,
    after the last backward), and for D in the G phase: D is frozen there, and a synchronizing
    forward would leave its DDP expecting gradients that never come, so that it would average
    during the next step's first micro-batch regardless of no_sync."""
    if skip and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


__all__ = [
    "CPUSyncBatchNorm",
    "DataParallelLoss",
    "any_rank",
    "average_across_ranks",
    "broadcast_from_main",
    "data_parallel_device",
    "data_parallel_loss",
    "gather_from_ranks",
    "is_distributed",
    "launched_by_torchrun",
    "process_group",
    "rank",
    "rank_seed",
    "skip_gradient_sync",
    "sync_batch_norm",
    "wait_for_ranks",
    "world_size",
]
