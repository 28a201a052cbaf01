"""Data-parallel training (sketchcolor.distributed) on the CPU: gloo, 2 processes, tiny models.

End to end, ``sketchcolor train`` runs under torchrun (tests/_torchrun_train.py records every
file each rank writes): its steps are compared with one process training on the same global
batch, a run killed after a checkpoint resumes on 2 ranks, and only rank 0 writes. The parts
(global-batch batch norm, the correspondence weighting, no_sync, per-rank RNG in checkpoints,
the collectives) are checked in 2 processes started with torch.multiprocessing.

Every launch has a deadline: a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import Dataset

from sketchcolor.checkpoint import read_checkpoint, write_checkpoint
from sketchcolor.cli import main
from sketchcolor.data import make_dataset
from sketchcolor.distributed import (
    CPUSyncBatchNorm,
    DataParallelLoss,
    any_rank,
    average_across_ranks,
    broadcast_from_main,
    data_parallel_device,
    data_parallel_loss,
    gather_from_ranks,
    rank_seed,
)
from sketchcolor.losses import ColorizationLoss, LossConfig, correspondence_term_count
from sketchcolor.models import Generator, ModelConfig, PatchDiscriminator
from sketchcolor.train import (
    BatchStream,
    TrainConfig,
    Trainer,
    build_loss,
    build_models,
    build_optimizers,
    checkpoint_state,
    list_checkpoints,
    restore_checkpoint,
    seed_everything,
    train,
    train_step,
)

RANKS = 2
LAUNCH_TIMEOUT_S = 240
ENTRY = Path(__file__).with_name("_torchrun_train.py")

# A 8x8 SCFT grid (32 / 4): warps push some sketch cells outside the reference, so ranks hold
# different numbers of valid correspondence terms and their weighting matters.
TINY_MODEL = ModelConfig(width=2, scft_stride=4, residual_blocks=1, disc_width=8, disc_layers=2)
LOSS = LossConfig(negatives="hardest")
PER_RANK_BATCH, ACCUMULATE, DATASET_LENGTH, STEPS, SEED = 2, 2, 12, 3, 3
# Per rank 6 items an epoch, 3 micro-batches of 2: step 2 ends epoch 0 and starts epoch 1.
RUN_OPTIONS = [
    "--size", "64", "--width", "2", "--scft-stride", "4", "--residual-blocks", "1", "--disc-width", "8",
    "--disc-layers", "2", "--negatives", "hardest", "--attn", "cpp", "--device", "cpu", "--workers", "0",
    "--dataset-length", str(DATASET_LENGTH), "--batch-size", str(PER_RANK_BATCH), "--accumulate", str(ACCUMULATE),
    "--seed", str(SEED), "--steps", str(STEPS), "--log-every", "1", "--sample-every", "2", "--checkpoint-every", "1",
    "--keep-checkpoints", "5",
]  # fmt: skip


def single_process_config(out: Path, steps: int, resume: Path | None) -> TrainConfig:
    """The run above as one process: its global batch (RANKS x PER_RANK_BATCH) in one micro-batch."""
    return TrainConfig(
        size=64, dataset_length=DATASET_LENGTH, steps=steps, batch_size=RANKS * PER_RANK_BATCH, accumulate=ACCUMULATE,
        seed=SEED, attn="cpp", device="cpu", workers=0, out=str(out), log_every=1, sample_every=2, checkpoint_every=1,
        keep_checkpoints=5, resume=None if resume is None else str(resume), model=TINY_MODEL, loss=LOSS,
    )  # fmt: skip


# Two ranks share this 2-core machine; intra-op threads would only fight over it.
pytestmark = pytest.mark.usefixtures("one_thread")


# --- launching ---------------------------------------------------------------------------------


class Launch:
    """One ``torchrun --nproc_per_node=2 ... sketchcolor train`` run: exit status, the output of
    both ranks, and the paths each rank wrote under its --out. With ``interrupt_after_step``,
    torchrun gets SIGINT (a Ctrl-C) once the metrics of that step are written."""

    def __init__(
        self,
        out: Path,
        *options: str,
        kill_after_checkpoint: int | None = None,
        interrupt_after_step: int | None = None,
        non_finite_at_step: int | None = None,
    ) -> None:
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        writes_dir = Path(tempfile.mkdtemp(prefix=f"{out.name}-writes-", dir=out.parent))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SKETCHCOLOR_TEST_WRITES_DIR": str(writes_dir)}
        env.pop("SKETCHCOLOR_TEST_KILL_AFTER_CHECKPOINT", None)
        env.pop("SKETCHCOLOR_TEST_NONFINITE_AT_STEP", None)
        if kill_after_checkpoint is not None:
            env["SKETCHCOLOR_TEST_KILL_AFTER_CHECKPOINT"] = str(kill_after_checkpoint)
        if non_finite_at_step is not None:
            env["SKETCHCOLOR_TEST_NONFINITE_AT_STEP"] = str(non_finite_at_step)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
            str(ENTRY), "train", *RUN_OPTIONS, *options, "--out", str(out),
        ]  # fmt: skip
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        log_path = writes_dir / "output.txt"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if interrupt_after_step is not None:
                while logged_steps(out) < interrupt_after_step and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                process.send_signal(signal.SIGINT)
            self.returncode = process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            # On SIGTERM torchrun stops its workers (which run in sessions of their own).
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
        self.output = log_path.read_text()
        self.writes = {rank: (writes_dir / f"rank-{rank}.txt").read_text().splitlines() for rank in range(RANKS)}

    def check(self) -> Launch:
        assert self.returncode == 0, self.output[-4000:]
        return self


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory) -> Launch:
    return Launch(tmp_path_factory.mktemp("parallel") / "run").check()


# --- two ranks train like one process with the global batch ----------------------------------


PARAMETER_NAMES = {
    "generator": [name for name, _ in Generator(TINY_MODEL).named_parameters()],
    "discriminator": [name for name, _ in PatchDiscriminator(TINY_MODEL).named_parameters()],
}


def assert_same_step(single_path: Path, parallel_path: Path, start_path: Path | None) -> None:
    """The checkpoints after one step from the same state (``start_path``, or fresh weights)
    hold the same training state.

    Adam's moments carry each step's gradients and are compared to 1e-3 of each tensor's
    largest entry. Weights are compared where the step's gradient is above 1e-3 of the tensor's
    largest: where it is at rounding level (a conv weight on a constant channel before batch
    norm, say), Adam's step lr * g / |g| has the sign of the rounding and is a full +-lr either
    way. Buffers (batch-norm statistics, spectral-norm vectors) to 1e-5 of their largest entry.
    """
    single, parallel = read_checkpoint(single_path), read_checkpoint(parallel_path)
    start = None if start_path is None else read_checkpoint(start_path)
    assert (parallel["step"], parallel["data"]) == (single["step"], single["data"])
    config = single_process_config(Path("."), STEPS, None)
    for model, optimizer, lr in (("generator", "optimizer_g", config.lr_g), ("discriminator", "optimizer_d", config.lr_d)):
        names = PARAMETER_NAMES[model]
        for index, expected in single[optimizer]["state"].items():
            actual = parallel[optimizer]["state"][index]
            for moment in ("exp_avg", "exp_avg_sq"):
                tolerance = 1e-3 * float(expected[moment].abs().max())
                torch.testing.assert_close(actual[moment], expected[moment], rtol=0, atol=tolerance, msg=lambda m: f"{model} {names[index]} {moment}: {m}")
            previous = torch.zeros_like(expected["exp_avg"]) if start is None else start[optimizer]["state"][index]["exp_avg"]
            gradient = (expected["exp_avg"] - config.beta1 * previous) / (1 - config.beta1)
            significant = gradient.abs() > 1e-3 * gradient.abs().max()
            difference = (parallel[model][names[index]] - single[model][names[index]]).abs()
            assert float(torch.where(significant, difference, 0).max()) <= 0.01 * lr, f"{model} {names[index]}"
        for name, value in single[model].items():
            if name in names:
                continue
            if value.is_floating_point():
                torch.testing.assert_close(parallel[model][name], value, rtol=0, atol=1e-5 * float(value.abs().max()), msg=lambda m: f"{model} {name}: {m}")
            else:
                assert torch.equal(parallel[model][name], value), f"{model} {name}"


def test_two_ranks_train_like_one_process_with_the_global_batch(parallel_run, tmp_path):
    """Every step of the 2-rank run (per-rank batch 2, accumulating 2 micro-batches, the fused
    C++ ops, an epoch boundary inside step 2) equals one process's step with batch 4 from the same
    state: step 1 from the same fresh weights, later steps from the 2-rank checkpoint before them.

    Runs that differ by float rounding drift apart over several steps, through the discrete
    hardest-negative choice and Adam's normalization of near-zero gradients, so a comparison of
    whole runs could only use a tolerance too wide to notice a wrong gradient."""
    parallel_checkpoints = list_checkpoints(parallel_run.out)
    assert [read_checkpoint(path, ("step",))["step"] for path in parallel_checkpoints] == list(range(1, STEPS + 1))
    parallel_metrics = metrics(parallel_run.out)
    start = None
    for step, parallel_checkpoint in enumerate(parallel_checkpoints, start=1):
        single = train(single_process_config(tmp_path / f"step-{step}", step, start))
        assert_same_step(single.checkpoint, parallel_checkpoint, start)
        # The logged losses are the ranks' averages: the global batch's means.
        (expected,) = metrics(single.out)[-1:]
        actual = parallel_metrics[step - 1]
        losses = [name for name in expected if name.startswith(("D/", "G/"))]
        assert losses and actual["step"] == expected["step"] == step
        for name in losses:
            assert actual[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (step, name)
        start = parallel_checkpoint


# --- only rank 0 writes, every rank resumes ----------------------------------------------------


def assert_only_rank_0_wrote(launch: Launch, steps: list[int]) -> None:
    assert launch.writes[1] == [], f"rank 1 wrote: {launch.writes[1]}"
    written = "\n".join(launch.writes[0])
    for step in steps:
        assert f"checkpoint-{step:08d}.safetensors" in written  # the rename of the finished file
    for name in ("metrics.jsonl", "config.json", f"step-{steps[-1]:08d}.png"):
        assert name in written
    # Messages and the final line come from rank 0 alone.
    assert launch.output.count("perceptual and style losses are off") == 1


def test_only_rank_0_writes_files_and_prints(parallel_run):
    assert_only_rank_0_wrote(parallel_run, list(range(1, STEPS + 1)))
    assert parallel_run.output.count(f"step {STEPS}; checkpoint:") == 1
    assert sorted(path.name for path in parallel_run.out.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "samples"]


def test_a_killed_run_resumes_on_two_ranks(parallel_run, tmp_path):
    out = tmp_path / "run"
    killed = Launch(out, kill_after_checkpoint=2)
    assert killed.returncode != 0, "rank 0 was to die after its step-2 checkpoint"
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-00000001.safetensors", "checkpoint-00000002.safetensors"]
    assert_only_rank_0_wrote(killed, [1, 2])

    resumed = Launch(out, "--resume", "auto").check()
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-00000002.safetensors'} at step 2" in resumed.output
    assert [line["step"] for line in metrics(out)] == [1, 2, 3]
    assert_only_rank_0_wrote(resumed, [3])
    # Continued exactly: the same state as the uninterrupted run's.
    finished, uninterrupted = read_checkpoint(list_checkpoints(out)[-1]), read_checkpoint(list_checkpoints(parallel_run.out)[-1])
    for section in ("step", "data", "generator", "discriminator", "optimizer_g", "optimizer_d", "rng_by_rank"):
        assert_equal_trees(finished[section], uninterrupted[section], section)


def test_a_non_finite_loss_stops_every_rank_after_the_last_good_state_is_written(tmp_path):
    # Every rank stops at once, but rank 0 writes the checkpoint (slowly here): had the others
    # exited before it was written, torchrun would have stopped rank 0 with it unwritten.
    out = tmp_path / "run"
    launch = Launch(out, "--checkpoint-every", "100", non_finite_at_step=2)
    assert launch.returncode != 0
    saved = out / "checkpoints" / "checkpoint-00000001.safetensors"
    assert f"stopped, the last good state (step 1) is in {saved}" in launch.output, launch.output[-4000:]
    assert list_checkpoints(out) == [saved] and read_checkpoint(saved)["step"] == 1
    assert launch.writes[1] == [], f"rank 1 wrote: {launch.writes[1]}"


def test_ctrl_c_stops_every_rank_after_the_same_step(tmp_path):
    out = tmp_path / "run"
    launch = Launch(out, "--steps", "100000", "--checkpoint-every", "100000", interrupt_after_step=1)
    (stopped,) = re.findall(r"stopped at step (\d+) \(interrupted\)", launch.output)
    step = int(stopped)
    assert [path.name for path in list_checkpoints(out)] == [f"checkpoint-{step:08d}.safetensors"]
    assert metrics(out)[-1]["step"] == step
    assert_only_rank_0_wrote(launch, [step])


def assert_equal_trees(a, b, path: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path}: max difference {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_equal_trees(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f"{path}/{index}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# --- the parts, in 2 processes -----------------------------------------------------------------


def _check_collectives(rank: int) -> None:
    averaged = average_across_ranks({"a": torch.tensor(float(rank + 1)), "b": torch.tensor(2.0)})
    assert list(averaged) == ["a", "b"] and averaged["a"].item() == 1.5 and averaged["b"].item() == 2.0
    assert any_rank(rank == 1, False) == (True, False)
    assert gather_from_ranks(10 * rank) == [0, 10]
    assert broadcast_from_main(f"rank {rank}") == "rank 0"


def _check_sync_batch_norm(rank: int) -> None:
    """Each rank normalizes its half of a batch like BatchNorm2d normalizes the whole of it."""
    generator = torch.Generator().manual_seed(0)  # the same global batch on both ranks
    images = torch.randn(6, 3, 5, 5, generator=generator) * 3 + 1
    upstream = torch.randn(6, 3, 5, 5, generator=generator)
    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5, generator=generator)
        reference.bias.normal_(generator=generator)
    model = nn.Sequential(nn.Identity(), copy.deepcopy(reference))
    original = model[1]
    CPUSyncBatchNorm.convert(model)
    synced = model[1]
    assert isinstance(synced, CPUSyncBatchNorm) and synced.weight is original.weight and synced.running_var is original.running_var

    whole = images.clone().requires_grad_()
    expected = reference(whole)
    (expected * upstream).sum().backward()
    half = slice(3 * rank, 3 * rank + 3)
    part = images[half].clone().requires_grad_()
    output = model(part)
    (output * upstream[half]).sum().backward()
    torch.testing.assert_close(output, expected[half])
    torch.testing.assert_close(part.grad, whole.grad[half])
    # The loss is the sum of the ranks' losses: the parameter gradients are the ranks' sums.
    gradients = torch.cat([synced.weight.grad, synced.bias.grad])
    dist.all_reduce(gradients)
    torch.testing.assert_close(gradients, torch.cat([reference.weight.grad, reference.bias.grad]))
    torch.testing.assert_close(synced.running_mean, reference.running_mean)
    torch.testing.assert_close(synced.running_var, reference.running_var)
    assert synced.num_batches_tracked.item() == reference.num_batches_tracked.item() == 1
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(images[half]), reference(images[half]))


def _check_correspondence_weighting(rank: int) -> None:
    """Each rank accumulating two micro-batches of one sample: the weighted correspondence
    losses, averaged over the micro-batches and the ranks, are the global batch's mean, and their
    gradients (which DDP averages) its gradient, though the micro-batches hold different numbers
    of valid terms. A 3x3 key grid: its center cell has no hardest negative and no term."""
    base = ColorizationLoss(Generator(TINY_MODEL, "reference"), PatchDiscriminator(TINY_MODEL), LOSS, attn_impl="reference")
    parallel = DataParallelLoss(base, base.generator, base.discriminator)
    generator = torch.Generator().manual_seed(1)
    query, key = torch.randn(4, 9, 8, generator=generator), torch.randn(4, 9, 8, generator=generator)
    pos = torch.randint(0, 9, (4, 9), generator=generator)
    pos[2:, :4] = -1  # rank 1's samples: fewer valid cells
    pos[3, 4:7] = -1  # and different numbers in its two micro-batches
    pos[0, 0] = 4  # the center
    reference = torch.empty(4, 3, 3 * TINY_MODEL.scft_stride, 3 * TINY_MODEL.scft_stride)
    counts = gather_from_ranks(int(correspondence_term_count(pos[2 * rank : 2 * rank + 2], (3, 3), True, 1)))
    assert counts[0] != counts[1]

    whole_query, whole_key = query.clone().requires_grad_(), key.clone().requires_grad_()
    expected = base._correspondence(whole_query, whole_key, pos, reference)
    expected.backward()
    half = slice(2 * rank, 2 * rank + 2)
    part_query, part_key = query[half].clone().requires_grad_(), key[half].clone().requires_grad_()
    micro_batches = [{"pos": pos[[index]], "reference": reference[[index]]} for index in range(2 * rank, 2 * rank + 2)]
    parallel.weigh_micro_batches(micro_batches)
    value = sum(
        parallel._correspondence(part_query[[j]], part_key[[j]], batch["pos"], batch["reference"]) * batch["correspondence_share"]
        for j, batch in enumerate(micro_batches)
    ) / len(micro_batches)
    value.backward()
    torch.testing.assert_close(average_across_ranks({"value": value})["value"], expected.detach())
    torch.testing.assert_close(part_query.grad / RANKS, whole_query.grad[half])
    torch.testing.assert_close(part_key.grad / RANKS, whole_key.grad[half])


def _check_gradients_are_averaged_once_per_step(rank: int) -> None:
    """With 3 micro-batches a step, DDP communicates as often as with 1 (no_sync before the
    last), for G and for D."""
    config = TrainConfig(size=32, batch_size=1, attn="reference", device="cpu", workers=0, model=TINY_MODEL, loss=LOSS)
    device = torch.device("cpu")
    seed_everything(0)
    generator, discriminator = build_models(config, device)
    optimizer_g, optimizer_d = build_optimizers(config, generator, discriminator)
    loss = data_parallel_loss(build_loss(config, generator, discriminator, device, lambda message: None), device)
    calls = {"G": 0, "D": 0}

    def counting(name):
        def hook(process_group, bucket):
            calls[name] += 1
            return allreduce_hook(process_group, bucket)

        return hook

    loss.generator.register_comm_hook(None, counting("G"))
    loss.discriminator.register_comm_hook(None, counting("D"))
    dataset = make_dataset(None, 32, 32 // TINY_MODEL.scft_stride, seed=rank, length=3)
    batches = [{name: value[None] for name, value in dataset[index].items()} for index in range(3)]

    def communications(micro_batches: int) -> dict[str, int]:
        before = dict(calls)
        train_step(loss, batches[:micro_batches], optimizer_g, optimizer_d, contextlib.nullcontext)
        return {name: calls[name] - before[name] for name in calls}

    communications(1)  # DDP regroups its buckets after the first step
    once = communications(1)
    assert once["G"] > 0 and once["D"] > 0
    three = communications(3)
    assert three == once, (once, three)


def _check_checkpoints_hold_every_ranks_rng(rank: int, folder: str) -> None:
    config = TrainConfig(size=32, dataset_length=4, batch_size=1, seed=5, attn="reference", device="cpu", workers=0, model=TINY_MODEL, loss=LOSS)
    device = torch.device("cpu")
    generator, discriminator = build_models(config, device)
    stream = BatchStream(make_dataset(None, 32, 8, 5, 4), 1, 5, 0, rank=rank, world_size=RANKS)
    trainer = Trainer(config, generator, discriminator, *build_optimizers(config, generator, discriminator), stream)
    seed_everything(rank_seed(config.seed, rank, 0))
    own_state = torch.get_rng_state()
    state = checkpoint_state(trainer)
    states = [entry["torch"] for entry in state["rng_by_rank"]]
    assert len(states) == RANKS and torch.equal(states[rank], own_state) and not torch.equal(states[0], states[1])
    path = Path(folder) / "checkpoint.safetensors"
    if rank == 0:
        write_checkpoint(path, state)
    dist.barrier()
    torch.rand(100)
    restore_checkpoint(trainer, path)
    assert torch.equal(torch.get_rng_state(), own_state)


def _two_rank_checks(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=RANKS)
    try:
        _check_collectives(rank)
        _check_sync_batch_norm(rank)
        _check_correspondence_weighting(rank)
        _check_gradients_are_averaged_once_per_step(rank)
        _check_checkpoints_hold_every_ranks_rng(rank, folder)
    finally:
        dist.destroy_process_group()


def test_the_parts_across_two_ranks(tmp_path):
    context = mp.start_processes(_two_rank_checks, args=(str(tmp_path),), nprocs=RANKS, join=False, start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # raises what a rank raised
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-rank checks did not finish within {LAUNCH_TIMEOUT_S} s")


# --- single-process parts ----------------------------------------------------------------------


class _Indices(Dataset):
    def __init__(self, length: int) -> None:
        self.length, self.epoch = length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index), "epoch": torch.tensor(self.epoch)}


def _items(batch) -> list[tuple[int, int]]:
    return sorted(zip(batch["epoch"].tolist(), batch["index"].tolist()))


def test_batch_stream_ranks_share_each_global_batch():
    dataset = _Indices(10)  # per epoch: 8 items in 2 global batches of 4, the same 2 dropped
    single = BatchStream(dataset, 4, seed=7, workers=0)
    ranks = [BatchStream(_Indices(10), 2, seed=7, workers=0, rank=rank, world_size=2) for rank in range(2)]
    for _ in range(5):
        parts = [next(stream) for stream in ranks]
        assert _items(next(single)) == sorted(_items(parts[0]) + _items(parts[1]))
    assert ranks[0].state() == ranks[1].state() == single.state() == {"epoch": 2, "position": 4}

    # A single-process position resumed on 2 ranks continues at the next multiple of 2.
    single = BatchStream(_Indices(10), 1, seed=7, workers=0)
    resumed = [BatchStream(_Indices(10), 1, seed=7, workers=0, rank=rank, world_size=2) for rank in range(2)]
    for stream in (single, *resumed):
        stream.load_state({"epoch": 1, "position": 3})
    _skipped, *expected = (_items(next(single)) for _ in range(3))
    assert sorted(_items(next(resumed[0])) + _items(next(resumed[1]))) == sorted(expected[0] + expected[1])
    with pytest.raises(ValueError, match=r"dataset \(3 items split over 2 ranks\)"):
        BatchStream(_Indices(3), 2, seed=7, workers=0, rank=0, world_size=2)


def test_devices_under_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert data_parallel_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        data_parallel_device("cuda:1")
    if not torch.cuda.is_available():
        assert data_parallel_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="has no GPU"):
            data_parallel_device("cuda")


def test_distributed_flag_without_torchrun_says_how_to_launch(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--distributed", *RUN_OPTIONS, "--out", str(tmp_path)]) == 2
    assert "torchrun --nproc_per_node=N -m sketchcolor train" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
