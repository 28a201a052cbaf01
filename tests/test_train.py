"""The loss and the training loop: backend parity of a step, checkpoints, exact resume,
non-finite losses and Ctrl-C, on tiny models (32x32 images, width 2)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sketchcolor.train as train_module
from sketchcolor.checkpoint import FORMAT, read_checkpoint, write_checkpoint
from sketchcolor.colorize import load_generator
from sketchcolor.correspondence_match import correspondence_hits
from sketchcolor.data import make_dataset
from sketchcolor.losses import ColorizationLoss, LossConfig, correspondence_term_count, gram_matrix, sample_negatives
from sketchcolor.models import Generator, ModelConfig, PatchDiscriminator, vgg19_features
from sketchcolor import ops
from sketchcolor.ops._backends import unavailable_reason
from sketchcolor.train import (
    BatchStream,
    NonFiniteLossError,
    TrainConfig,
    build_loss,
    build_models,
    build_optimizers,
    find_checkpoint,
    list_checkpoints,
    seed_everything,
    train,
    train_step,
    use_bf16_autocast,
)

# One thread for the whole module: the reference runs, which exact-resume tests compare with
# bitwise, must use the same thread count (reduction order) as the tests.
pytestmark = pytest.mark.usefixtures("one_thread")


TINY_MODEL = ModelConfig(width=2, scft_stride=8, residual_blocks=1, disc_width=8, disc_layers=2)


def tiny_config(out, **changes) -> TrainConfig:
    # 6 items at batch 2: an epoch is 3 steps, so 4 steps cross an epoch boundary.
    values = dict(
        size=32, dataset_length=6, steps=4, batch_size=2, seed=3, attn="reference", device="cpu", workers=0,
        out=str(out), log_every=1, sample_every=2, checkpoint_every=2, keep_checkpoints=5, model=TINY_MODEL,
    )
    values.update(changes)
    return TrainConfig(**values)


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """Every entry of a checkpoint's state tree by its path, except the run's config (which names
    its output folder and step count)."""
    flat = {}

    def walk(tree, prefix):
        if isinstance(tree, torch.Tensor):
            flat[prefix] = tree
        elif isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}/{key}")
        elif isinstance(tree, (list, tuple)):
            for index, value in enumerate(tree):
                walk(value, f"{prefix}/{index}")
        else:
            flat[prefix] = tree

    state = read_checkpoint(path)
    del state["config"]
    walk(state, "")
    return flat


def assert_same_checkpoint(path_a, path_b):
    a, b = checkpoint_tensors(path_a), checkpoint_tensors(path_b)
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), f"{name} differs: max {(a[name].double() - b[name].double()).abs().max()}"
        else:
            assert a[name] == b[name], f"{name}: {a[name]!r} != {b[name]!r}"


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs of 2 and 4 steps, for comparison."""
    root = tmp_path_factory.mktemp("runs")
    two = train(tiny_config(root / "two", steps=2))
    four = train(tiny_config(root / "four", steps=4))
    return two, four


# --- loss --------------------------------------------------------------------------------------


def test_sample_negatives_avoid_the_positive():
    pos = torch.randint(-1, 7, (3, 50))
    negatives = sample_negatives(pos, 7, 16)
    assert negatives.shape == (3, 50, 16) and negatives.dtype == torch.int64
    assert negatives.min() >= 0 and negatives.max() < 7
    assert not (negatives == pos.unsqueeze(-1)).any()
    with pytest.raises(ValueError, match="at least 2"):
        sample_negatives(pos, 1, 4)


class _StubDiscriminator(nn.Module):
    """Scores 0.5 on the real image it was given and -0.25 on anything else."""

    def __init__(self, real: torch.Tensor) -> None:
        super().__init__()
        self.real = real
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, sketch, image):
        value = 0.5 if image is self.real else -0.25
        return torch.full((image.shape[0], 1, 2, 2), value) + self.weight


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    ("gan_loss", "d_loss", "g_adversarial"),
    [
        ("lsgan", 0.5 * (0.25 + 0.0625), 1.5625),
        ("hinge", 0.5 + 0.75, 0.25),
        # -log sigmoid(0.5) - log(1 - sigmoid(-0.25)); for G the non-saturating -log sigmoid(-0.25).
        ("standard", softplus(-0.5) + softplus(-0.25), softplus(0.25)),
    ],
)
def test_adversarial_objectives(gan_loss, d_loss, g_adversarial):
    batch = make_dataset(None, 32, 4, seed=1, length=2)
    batch = {name: torch.stack([batch[i][name] for i in range(2)]) for name in batch[0]}
    generator = Generator(TINY_MODEL, attn_impl="reference")
    loss = ColorizationLoss(generator, _StubDiscriminator(batch["ground_truth"]), LossConfig(gan_loss=gan_loss), attn_impl="reference")
    value, terms = loss.run_D(batch)
    assert value.item() == pytest.approx(d_loss)
    _, terms = loss.run_G(batch)
    assert terms["G/adversarial"].item() == pytest.approx(g_adversarial)


def test_generator_terms_follow_the_weights(tmp_path):
    features = vgg19_features()
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg.pth")
    config = tiny_config(tmp_path, vgg_weights=str(tmp_path / "vgg.pth"), loss=LossConfig(adversarial_weight=0.0, negatives="hardest"))
    generator, discriminator = build_models(config, torch.device("cpu"))
    messages = []
    loss = build_loss(config, generator, discriminator, torch.device("cpu"), messages.append)
    assert messages == []
    dataset = make_dataset(None, 32, 4, seed=1, length=2)
    batch = {name: torch.stack([dataset[i][name] for i in range(2)]) for name in dataset[0]}
    total, terms = loss.run_G(batch)
    assert set(terms) == {"G/l1", "G/correspondence", "G/perceptual", "G/style", "SCFT/within_one"}
    weights = LossConfig()
    expected = sum(getattr(weights, f"{name}_weight") * terms[f"G/{name}"] for name in ("l1", "correspondence", "perceptual", "style"))
    torch.testing.assert_close(total.detach(), expected)
    # Beside the terms, outside the loss: the rate of SCFT's best keys near the true cells (all 16 of a 4x4 grid).
    with torch.no_grad():
        output = generator(batch["sketch"], batch["reference"])
    _, within_one, _, cells = correspondence_hits(output.query, output.key, batch["pos"], (4, 4))
    assert terms["SCFT/within_one"].item() == pytest.approx((within_one / cells).item())

    without_vgg = tiny_config(tmp_path)
    loss = build_loss(without_vgg, generator, discriminator, torch.device("cpu"), messages.append)
    assert len(messages) == 1 and "perceptual and style losses are off" in messages[0]
    assert "G/perceptual" not in loss.run_G(batch)[1]


@pytest.mark.parametrize("key_grid", [(3, 3), (3, 5), (4, 4)])
def test_correspondence_term_count_agrees_with_the_op(key_grid):
    """With all scores 0, a hardest-negative term is the margin where it exists: the op gives
    margin for a single query exactly where the count says it has a term."""
    cells = key_grid[0] * key_grid[1]
    for cell in range(-1, cells):
        pos = torch.tensor([[cell]])
        value = ops.correspondence_loss(torch.zeros(1, 1, 4), torch.zeros(1, cells, 4), pos, margin=1.0, hardest=True, key_grid=key_grid, impl="reference")
        count = correspondence_term_count(pos, key_grid, hardest=True, exclusion=ColorizationLoss.HARDEST_EXCLUSION)
        assert value.item() == count.item(), (key_grid, cell)
    assert correspondence_term_count(torch.tensor([[0, -1, 4]]), key_grid, hardest=False, exclusion=1).item() == 2


def test_accumulated_micro_batches_weigh_the_correspondence_loss_like_one_batch():
    # The loss is a mean over valid terms: micro-batches with fewer of them must count less, so
    # that the loop's average over micro-batches is the whole batch's mean. Hardest negatives on
    # a 3x3 key grid, whose center cell has none.
    loss = ColorizationLoss(Generator(TINY_MODEL), PatchDiscriminator(TINY_MODEL), LossConfig(negatives="hardest"), attn_impl="reference")
    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(4, 9, 8, generator=generator), torch.randn(4, 9, 8, generator=generator)
    pos = torch.randint(0, 9, (4, 9), generator=generator)
    pos[2:, :5] = -1
    pos[0, 0] = 4
    reference = torch.empty(4, 3, 3 * TINY_MODEL.scft_stride, 3 * TINY_MODEL.scft_stride)
    parts = (slice(0, 1), slice(1, 3), slice(3, 4))
    micro_batches = [{"pos": pos[part], "reference": reference[part]} for part in parts]
    loss.weigh_micro_batches(micro_batches)
    assert len({float(batch["correspondence_share"]) for batch in micro_batches}) == 3
    whole = loss._correspondence(query, key, pos, reference)
    accumulated = sum(
        loss._correspondence(query[part], key[part], pos[part], reference[part]) * batch["correspondence_share"]
        for part, batch in zip(parts, micro_batches)
    ) / len(parts)
    torch.testing.assert_close(accumulated, whole)
    # Sampled negatives: every cell with a reference cell has the same number of terms.
    sampled = ColorizationLoss(loss.generator, loss.discriminator, LossConfig(negatives="sampled"), attn_impl="reference")
    micro_batches = [{"pos": pos[part], "reference": reference[part]} for part in parts]
    sampled.weigh_micro_batches(micro_batches)
    valid = [int((pos[part] >= 0).sum()) for part in parts]
    shares = [float(batch["correspondence_share"]) for batch in micro_batches]
    assert shares == pytest.approx([count * len(parts) / sum(valid) for count in valid])


def test_a_step_updates_batch_norm_statistics_once_per_micro_batch():
    # The D phase's generator pass sees the same weights and batch as the G phase's: folding its
    # statistics in as well would count every batch twice.
    config = tiny_config(".")
    generator, discriminator = build_models(config, torch.device("cpu"))
    optimizer_g, optimizer_d = build_optimizers(config, generator, discriminator)
    loss = build_loss(config, generator, discriminator, torch.device("cpu"), lambda message: None)
    dataset = make_dataset(None, 32, 4, seed=0, length=4)
    batches = [{name: torch.stack([dataset[i][name] for i in range(j, j + 2)]) for name in dataset[0]} for j in (0, 2)]
    norms = [module for module in generator.modules() if isinstance(module, nn.BatchNorm2d)]
    assert norms
    before = [module.running_mean.clone() for module in norms]
    train_step(loss, batches, optimizer_g, optimizer_d, contextlib.nullcontext)
    assert [int(module.num_batches_tracked) for module in norms] == [2] * len(norms)
    assert all(not torch.equal(module.running_mean, mean) for module, mean in zip(norms, before))


def test_pos_must_match_the_scft_grid():
    dataset = make_dataset(None, 32, 8, seed=1, length=1)  # an 8x8 grid; the model's is 4x4
    batch = {name: value[None] for name, value in dataset[0].items()}
    generator = Generator(TINY_MODEL, attn_impl="reference")
    loss = ColorizationLoss(generator, PatchDiscriminator(TINY_MODEL), attn_impl="reference")
    with pytest.raises(ValueError, match="pos must have shape"):
        loss.run_G(batch)


# --- one step, every backend -------------------------------------------------------------------


def _one_step(attn: str, tmp_path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    config = tiny_config(tmp_path, attn=attn, model=ModelConfig(width=2, scft_stride=4, residual_blocks=1, disc_width=8, disc_layers=2))
    seed_everything(0)
    generator, discriminator = build_models(config, torch.device("cpu"))
    optimizer_g, optimizer_d = build_optimizers(config, generator, discriminator)
    loss = build_loss(config, generator, discriminator, torch.device("cpu"), lambda message: None)
    dataset = make_dataset(None, 32, 8, seed=0, length=4)
    batches = [{name: torch.stack([dataset[i][name] for i in range(j, j + 2)]) for name in dataset[0]} for j in (0, 2)]
    terms = train_step(loss, batches, optimizer_g, optimizer_d, contextlib.nullcontext)
    return {name: float(value) for name, value in terms.items()}, generator.state_dict()


def _cpu_backend(attn: str):
    # Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported).
    reason = unavailable_reason(attn, torch.device("cpu"), "scft_attn_fwd")
    return pytest.param(attn, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


@pytest.mark.parametrize("attn", [_cpu_backend("cpp"), _cpu_backend("triton")])
def test_a_training_step_matches_the_reference_backend(attn, tmp_path):
    expected_terms, expected_weights = _one_step("reference", tmp_path)
    terms, weights = _one_step(attn, tmp_path)
    assert terms.keys() == expected_terms.keys()
    for name in terms:
        assert terms[name] == pytest.approx(expected_terms[name], rel=1e-4, abs=1e-5), name
    for name in weights:
        torch.testing.assert_close(weights[name], expected_weights[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs triton; under TRITON_INTERPRET=1 the test above runs the triton case itself",
)
def test_a_training_step_matches_the_reference_backend_under_the_triton_interpreter():
    # triton reads TRITON_INTERPRET once, when imported: a fresh process runs the triton case.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_a_training_step_matches_the_reference_backend"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


# --- data order --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capability,expected", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 9), True), ((12, 0), True)]
)
def test_bf16_autocast_only_where_gpus_have_bf16_tensor_cores(capability, expected, monkeypatch):
    # No GPU here: the capability query is what the decision rests on.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    said = []
    assert use_bf16_autocast(True, torch.device("cuda", 0), said.append) is expected
    assert said == ([] if expected else [f"--amp: Tesla T4 (compute capability {capability[0]}.{capability[1]}) has no "
                                         "bfloat16 tensor cores; training in float32"])
    assert use_bf16_autocast(False, torch.device("cuda", 0), said.append) is False
    assert use_bf16_autocast(True, torch.device("cpu"), said.append) is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr_g": float("inf")}, "lr_g must be a finite positive number, got inf"),
        ({"lr_d": float("nan")}, "lr_d must be a finite positive number, got nan"),
        ({"dataset_length": 0}, "dataset_length must be None or a positive int, got 0"),
        ({"dataset_length": 2.5}, "dataset_length must be None or a positive int, got 2.5"),
        ({"size": 16, "model": ModelConfig(width=2, disc_layers=3)}, "size 16 is too small for disc_layers=3: .* the smallest size is 32"),
        ({"size": 32, "model": ModelConfig(width=2, disc_layers=6)}, "size 32 is too small for disc_layers=6: .* the smallest size is 192"),
        ({"size": 16, "batch_size": 1, "model": ModelConfig(width=2, scft_stride=8, disc_layers=1)},
         "size 16 with batch_size 1: the encoders' 1x1 deepest features would give batch norm one value per channel"),
        ({"size": 16, "model": ModelConfig(width=2, scft_stride=16, disc_layers=1)},
         "size 16 at scft_stride 16 leaves one reference cell: sampled negatives need at least 2"),
    ],
)
def test_config_rejects_bad_values(changes, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **changes)
    assert tiny_config(tmp_path, size=32, model=ModelConfig(width=2, disc_layers=3)).size == 32


@pytest.mark.parametrize("name", ["l1_weight", "correspondence_weight", "adversarial_weight", "perceptual_weight", "style_weight", "triplet_margin"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_loss_config_rejects_non_finite_numbers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite non-negative number, got {value}"):
        LossConfig(**{name: value})


@pytest.mark.parametrize("attn", ["cpp", "reference"])
def test_correspondence_loss_scores_autocast_q_and_k_in_float32(monkeypatch, attn):
    # The cuda kernels take no float32, so every backend gets the bfloat16 q and k of autocast and
    # scores them in float32 (autocast must not cast the reference's scores back to bfloat16).
    import sketchcolor.losses as losses_module

    model = ModelConfig(width=2, scft_stride=8, residual_blocks=1, disc_width=8, disc_layers=2)
    loss = ColorizationLoss(Generator(model), PatchDiscriminator(model), attn_impl=attn)
    query, key = (torch.randn(2, 16, model.feature_dim).bfloat16() for _ in range(2))
    pos = torch.randint(-1, 16, (2, 16))
    seen = []
    op = losses_module.ops.correspondence_loss

    def recording(q, k, *args, **kwargs):
        seen.append((q.dtype, k.dtype))
        return op(q, k, *args, **kwargs)

    monkeypatch.setattr(losses_module.ops, "correspondence_loss", recording)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss._correspondence(query, key, pos, torch.zeros(2, 3, 32, 32))
    assert seen == [(torch.bfloat16, torch.bfloat16)] and value.dtype == torch.float32
    torch.manual_seed(0)
    exact = loss._correspondence(query.double(), key.double(), pos, torch.zeros(2, 3, 32, 32))
    assert value.item() == pytest.approx(exact.item(), rel=1e-5)


def test_gram_matrices_are_float32_under_autocast():
    # The style loss is a difference of Gram matrices: rounded to bfloat16 it was 14% off.
    activation = torch.randn(2, 8, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = gram_matrix(activation)
    flat = activation.double().reshape(2, 8, 35)
    exact = flat @ flat.transpose(1, 2) / (8 * 35)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram.double(), exact, rtol=1e-5, atol=1e-6)


def test_an_attn_backend_that_cannot_run_fails_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "build_models", lambda *args: pytest.fail("the models were built"))
    with pytest.raises(ValueError, match=r"attn='cuda': impl='cuda' runs on CUDA tensors, got tensors on cpu"):
        train(tiny_config(tmp_path, attn="cuda"))
    # Under bf16 autocast both ops see bfloat16 q and k (the correspondence loss scores them in
    # float32 on every backend).
    asked = []

    def unavailable(impl, device, op_name, dtype=None):
        asked.append((impl, op_name, dtype))
        return "not here" if op_name == "corr_nll_loss" else None

    monkeypatch.setattr(train_module, "unavailable_reason", unavailable)
    monkeypatch.setattr(train_module, "use_bf16_autocast", lambda amp, device, say: True)
    with pytest.raises(ValueError, match="attn='cpp': not here"):
        train(tiny_config(tmp_path, attn="cpp"))
    assert asked == [("cpp", "scft_attn_fwd", torch.bfloat16), ("cpp", "corr_nll_loss", torch.bfloat16)]
    assert list(tmp_path.iterdir()) == []


def test_batch_stream_resumes_mid_epoch_and_wraps():
    dataset = make_dataset(None, 32, 4, seed=0, length=5)
    stream = BatchStream(dataset, 2, seed=0, workers=0)
    batches = [next(stream) for _ in range(5)]  # 2 per epoch (drop_last): epochs 0, 0, 1, 1, 2
    assert stream.state() == {"epoch": 2, "position": 2}
    resumed = BatchStream(dataset, 2, seed=0, workers=0)
    resumed.load_state({"epoch": 0, "position": 2})
    for expected in batches[1:]:
        batch = next(resumed)
        assert torch.equal(batch["reference"], expected["reference"]) and torch.equal(batch["pos"], expected["pos"])
    assert not torch.equal(batches[0]["sketch"], batches[2]["sketch"])  # a new epoch, a new order and augmentation
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(dataset, 6, seed=0, workers=0)


class _SigintAtStartDataset(torch.utils.data.Dataset):
    """Items that say whether SIGINT was ignored when the worker process unpickled the dataset:
    under spawn and forkserver, at its start, before its worker_init_fn."""

    def __init__(self) -> None:
        # Also makes the pickled state non-empty, without which unpickling skips __setstate__.
        self.ignored_at_start = False

    def __len__(self) -> int:
        return 2

    def set_epoch(self, epoch: int) -> None:
        pass

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ignored_at_start = signal.getsignal(signal.SIGINT) == signal.SIG_IGN

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"ignored_at_start": torch.tensor(self.ignored_at_start)}


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_batch_stream_workers_ignore_ctrl_c_from_their_start(start_method):
    # A worker started by spawn or forkserver runs seconds of imports before its worker_init_fn
    # ignores SIGINT; a Ctrl-C then killed it, and the run with it, unsaved. This process's own
    # handler and signal mask are as they were afterwards.
    import torch.multiprocessing as mp

    if start_method not in mp.get_all_start_methods():
        pytest.skip(f"no {start_method} start method on this platform")
    handler, mask = signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    previous = mp.get_start_method()
    mp.set_start_method(start_method, force=True)
    try:
        batch = next(BatchStream(_SigintAtStartDataset(), 2, seed=0, workers=1))
    finally:
        mp.set_start_method(previous, force=True)
    assert batch["ignored_at_start"].all()
    assert signal.getsignal(signal.SIGINT) == handler and signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


# --- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_file_round_trip(tmp_path):
    state = {
        "step": 7,
        "weights": {"layer.weight": torch.randn(3, 4), "step": torch.tensor(2.0), "empty": torch.zeros(0)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(2)}}, "param_groups": [{"betas": (0.5, 0.999), "params": [0]}]},
        "rng": {"python": (3, (1, 2, 3), None), "torch": torch.get_rng_state()},
        "name": "x",
    }
    path = tmp_path / "state.safetensors"
    write_checkpoint(path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # no temporary file left
    loaded = read_checkpoint(path)
    assert loaded["step"] == 7 and loaded["name"] == "x"
    assert torch.equal(loaded["weights"]["layer.weight"], state["weights"]["layer.weight"])
    assert loaded["weights"]["step"].shape == () and loaded["weights"]["empty"].shape == (0,)
    assert list(loaded["optimizer"]["state"]) == [0]
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.999)
    assert loaded["rng"]["python"] == (3, (1, 2, 3), None)
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert read_checkpoint(path, sections=("step",)) == {"step": 7}
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        read_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="unsupported type"):
        write_checkpoint(tmp_path / "other.safetensors", {"thing": object()})


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_checkpoint_gets_the_permissions_of_any_new_file(tmp_path, umask):
    # safetensors alone writes owner-only files, whatever the umask.
    previous = os.umask(umask)
    try:
        write_checkpoint(tmp_path / "state.safetensors", {"step": 1, "weight": torch.ones(2)})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "state.safetensors").stat().st_mode) == 0o666 & ~umask


@pytest.mark.skipif(os.name != "posix", reason="only POSIX systems let a folder be flushed")
def test_a_checkpoint_write_flushes_the_file_then_the_rename(tmp_path, monkeypatch):
    # Until its folder is flushed, a power loss can undo the rename that made the checkpoint.
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def recorded_fsync(descriptor):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "fsync file")
        real_fsync(descriptor)

    def recorded_replace(source, target):
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    write_checkpoint(tmp_path / "state.safetensors", {"step": 1, "weight": torch.ones(2)})
    assert events == ["fsync file", "rename", "fsync folder"]


def test_a_new_run_flushes_the_entries_of_the_folders_it_creates(tmp_path, monkeypatch):
    # A checkpoint is only as durable as the entries of the new folders above it: the run's
    # folder in its parent, checkpoints/ in the run's folder.
    import sketchcolor.checkpoint as checkpoint_module

    flushed = []
    monkeypatch.setattr(checkpoint_module, "sync_folder", flushed.append)
    out = tmp_path / "runs" / "first"
    train(tiny_config(out, steps=1, checkpoint_every=1))
    assert {tmp_path, tmp_path / "runs", out} <= set(flushed)
    assert flushed.index(out) < flushed.index(out / "checkpoints")  # checkpoints/'s entry before the file's rename
    flushed.clear()
    checkpoint_module.make_folders(out / "checkpoints")
    assert flushed == []  # nothing new, nothing to flush


def test_tensorboard_drops_the_steps_a_resumed_run_logs_again(tmp_path, monkeypatch):
    # Like metrics.jsonl: events after the checkpoint the run resumes from are logged again.
    made = []

    class SummaryWriter:
        def __init__(self, log_dir, **options):
            made.append((log_dir, options))

        def close(self):
            pass

    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    train_module.MetricsLog(tmp_path, 7).close()
    assert made == [(str(tmp_path / "tensorboard"), {"purge_step": 8})]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"format": FORMAT}, "its metadata has no 'state'"),
        ({"format": FORMAT, "state": '{"step": '}, "its state is not JSON"),
        ({"format": FORMAT, "state": json.dumps({"weights": {"$tensor": "weights/missing"}})}, "its state names the tensor 'weights/missing', which the file does not hold"),
    ],
)
def test_damaged_checkpoint_metadata_names_the_file(tmp_path, metadata, message):
    path = tmp_path / "damaged.safetensors"
    save_file({"weights/present": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(repr(str(path)))} is damaged: {message}"):
        read_checkpoint(path)


def _unexpected_key(weights: dict[str, torch.Tensor]) -> None:
    weights["extra.weight"] = torch.zeros(1)


def _missing_key(weights: dict[str, torch.Tensor]) -> None:
    del weights[next(iter(weights))]


def _wrong_shape(weights: dict[str, torch.Tensor]) -> None:
    name = next(iter(weights))
    weights[name] = torch.zeros(weights[name].numel() + 1)


@pytest.mark.parametrize("damage", [_unexpected_key, _missing_key, _wrong_shape])
def test_a_checkpoint_whose_weights_do_not_load_is_named(reference_runs, tmp_path, damage):
    two, _ = reference_runs
    state = read_checkpoint(two.checkpoint)
    damage(state["generator"])
    path = tmp_path / "damaged.safetensors"
    write_checkpoint(path, state)
    named = re.escape(repr(str(path)))
    with pytest.raises(ValueError, match=f"resume: checkpoint {named} does not load into this run"):
        train(tiny_config(tmp_path / "run", resume=str(path)))
    with pytest.raises(ValueError, match=f"checkpoint {named} holds no generator that loads"):
        load_generator(path)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_checkpoint_holding_non_finite_values_is_refused(reference_runs, tmp_path, value):
    # Training never saves such a state, so it is damage: unchecked, colorize writes black images
    # and a resumed run has NaN losses.
    two, _ = reference_runs
    state = read_checkpoint(two.checkpoint)
    name = next(iter(state["generator"]))
    state["generator"][name].view(-1)[0] = value
    path = tmp_path / "damaged.safetensors"
    write_checkpoint(path, state)
    message = f"checkpoint {re.escape(repr(str(path)))} is damaged: its tensor 'generator/{re.escape(name)}' holds NaN or infinite values"
    with pytest.raises(ValueError, match=message):
        load_generator(path)
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tmp_path / "run", resume=str(path)))


def test_resume_auto_from_an_unreadable_latest_checkpoint_names_the_one_before(tmp_path):
    train(tiny_config(tmp_path, steps=4, checkpoint_every=2))
    earlier, latest = list_checkpoints(tmp_path)
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a copy of the folder cut short
    with pytest.raises(ValueError, match=rf"cannot be read: .*; to continue from the checkpoint before it instead, pass --resume {re.escape(str(earlier))}$"):
        train(tiny_config(tmp_path, steps=6, resume="auto"))
    result = train(tiny_config(tmp_path, steps=6, resume=str(earlier)))
    assert result.step == 6


def test_run_writes_samples_metrics_and_keeps_the_last_checkpoints(reference_runs, tmp_path):
    result = train(tiny_config(tmp_path, steps=3, checkpoint_every=1, keep_checkpoints=2))
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-00000002.safetensors", "checkpoint-00000003.safetensors"]
    assert result.checkpoint == list_checkpoints(tmp_path)[-1] and result.step == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert {"D/loss", "G/loss", "G/l1", "G/correspondence", "G/adversarial"} <= lines[0].keys()
    samples = sorted((tmp_path / "samples").glob("*.png"))
    assert [path.name for path in samples] == ["step-00000002.png", "step-00000003.png"]
    from PIL import Image

    with Image.open(samples[0]) as grid:
        assert grid.size == (4 * 34, 8 * 34)  # sketch | reference | output | ground truth, 8 rows, 1px borders


def test_resume_continues_exactly(reference_runs, tmp_path, capsys):
    two, four = reference_runs
    shutil.copytree(two.out, tmp_path / "run")
    result = train(tiny_config(tmp_path / "run", steps=4, resume="auto"))
    assert result.step == 4
    assert_same_checkpoint(result.checkpoint, four.checkpoint)
    assert "settings changed" not in capsys.readouterr().out  # steps alone changed: a run setting


def test_a_fresh_run_refuses_an_out_that_holds_checkpoints(reference_runs, tmp_path, monkeypatch):
    two, _ = reference_runs
    run = tmp_path / "run"
    shutil.copytree(two.out, run)
    before = {path.name: path.read_bytes() for path in (*list_checkpoints(run), run / "metrics.jsonl")}
    monkeypatch.setattr(train_module, "build_models", lambda *args: pytest.fail("the models were built"))
    latest = run / "checkpoints" / "checkpoint-00000002.safetensors"
    with pytest.raises(ValueError, match=rf"out {re.escape(repr(str(run)))} already holds the checkpoints of a run \(the latest: {re.escape(str(latest))}\); pass --resume auto to continue that run, or choose another --out"):
        train(tiny_config(run, steps=4))
    # Nor may a run resumed from another folder's checkpoint write among this one's.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(two.out, elsewhere)
    with pytest.raises(ValueError, match="already holds the checkpoints of a run"):
        train(tiny_config(run, steps=4, resume=str(list_checkpoints(elsewhere)[-1])))
    assert {path.name: path.read_bytes() for path in (*list_checkpoints(run), run / "metrics.jsonl")} == before


def test_resume_takes_the_optimizer_settings_of_the_command_line_and_lists_the_changes(reference_runs, tmp_path, capsys):
    two, _ = reference_runs
    shutil.copytree(two.out, tmp_path / "run")
    changes = dict(lr_g=1e-3, lr_d=3e-4, beta1=0.8, beta2=0.99, loss=LossConfig(gan_loss="hinge"))
    result = train(tiny_config(tmp_path / "run", steps=3, resume="auto", log_every=3, **changes))
    assert (
        "settings changed since the checkpoint (saved -> now): lr_g 0.0001 -> 0.001, lr_d 0.0002 -> 0.0003, beta1 0.5 -> 0.8, "
        "beta2 0.999 -> 0.99, loss.gan_loss lsgan -> hinge\n"
    ) in capsys.readouterr().out
    state = read_checkpoint(result.checkpoint)
    for optimizer, lr in (("optimizer_g", 1e-3), ("optimizer_d", 3e-4)):
        (group,) = state[optimizer]["param_groups"]
        assert group["lr"] == lr and tuple(group["betas"]) == (0.8, 0.99)


def test_resume_with_another_number_of_processes_says_so(reference_runs, tmp_path, capsys):
    # batch_size is per process, so the global batch changes: the run lists it with the settings.
    two, _ = reference_runs
    shutil.copytree(two.out, tmp_path / "run")
    saved = list_checkpoints(tmp_path / "run")[-1]
    state = read_checkpoint(saved)
    write_checkpoint(saved, {**state, "rng_by_rank": [copy.deepcopy(state["rng"]) for _ in range(2)]})
    train(tiny_config(tmp_path / "run", steps=3, resume="auto"))
    assert "settings changed since the checkpoint (saved -> now): world_size 2 -> 1\n" in capsys.readouterr().out


def test_cuda_rng_states_restore_on_a_machine_with_fewer_gpus(monkeypatch):
    # A checkpoint holds a state per GPU its process saw: with fewer here, each existing one
    # gets its own (set_rng_state_all would index past the devices).
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    state = train_module.capture_rng()
    state["cuda"] = [torch.full((16,), index, dtype=torch.uint8) for index in range(8)]
    train_module.restore_rng(state)
    assert restored == [(0, 0), (1, 1)]


def test_resume_drops_the_metrics_logged_after_its_checkpoint(reference_runs, tmp_path):
    two, four = reference_runs
    run = tmp_path / "run"
    shutil.copytree(two.out, run)
    # As if the run had logged steps 3 and 4, then died before their checkpoint in the middle of a line.
    logged_later = (four.out / "metrics.jsonl").read_text().splitlines(keepends=True)[2:]
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.writelines([*logged_later, '{"step": 5, "D/lo'])
    train(tiny_config(run, steps=4, resume="auto"))
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(path.name for path in run.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "samples"]
    # A fresh run in a folder with metrics but no checkpoint (one that died before its first) starts the file anew.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(four.out / "metrics.jsonl", fresh)
    train(tiny_config(fresh, steps=1))
    assert [json.loads(line)["step"] for line in (fresh / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(reference_runs, tmp_path, capsys, monkeypatch):
    # They belong to the run this one replaces: left in place they would be the latest checkpoint,
    # and pruning (keep 2 here) would delete the new run's own first.
    _, four = reference_runs
    run = tmp_path / "run"
    shutil.copytree(four.out, run)
    earlier, later = list_checkpoints(run)
    flushed = []
    monkeypatch.setattr(train_module, "sync_folder", flushed.append)
    result = train(tiny_config(run, steps=3, checkpoint_every=1, keep_checkpoints=2, resume=str(earlier)))
    superseded = run / "checkpoints" / "superseded-00000002"
    assert flushed == [superseded, run / "checkpoints"]  # the moves last through a power loss
    assert f"moved the checkpoints after step 2, which this run replaces, to {superseded}" in capsys.readouterr().out
    assert [path.name for path in list_checkpoints(run)] == [earlier.name, "checkpoint-00000003.safetensors"]
    assert find_checkpoint(run) == result.checkpoint == list_checkpoints(run)[-1]
    assert [path.name for path in superseded.iterdir()] == [later.name]
    assert_same_checkpoint(superseded / later.name, four.checkpoint)
    # Again from step 2: a second folder, the first one kept.
    train(tiny_config(run, steps=3, resume=str(earlier)))
    assert [path.name for path in (run / "checkpoints" / "superseded-00000002-2").iterdir()] == ["checkpoint-00000003.safetensors"]
    assert [path.name for path in superseded.iterdir()] == [later.name]


def test_resume_rejects_another_model(reference_runs, tmp_path):
    two, _ = reference_runs
    with pytest.raises(ValueError, match="another model config"):
        train(tiny_config(tmp_path, resume=str(two.checkpoint), model=ModelConfig(width=3, scft_stride=8, residual_blocks=1, disc_width=8, disc_layers=2)))


@pytest.mark.parametrize("poison", ["loss", "gradients"])
@pytest.mark.parametrize(("phase", "network"), [("run_D", "discriminator"), ("run_G", "generator")])
def test_non_finite_values_stop_with_the_last_good_state(reference_runs, tmp_path, monkeypatch, phase, network, poison):
    # Step 3's loss is NaN, or finite with NaN gradients (which the optimizer step would write into
    # the weights): either way the run stops with step 2's state, finite and as an unbroken run had it.
    two, _ = reference_runs
    original = getattr(ColorizationLoss, phase)
    calls = []

    def poisoned(self, batch):
        calls.append(1)
        loss, terms = original(self, batch)
        if len(calls) == 3:
            if poison == "loss":
                loss = loss * float("nan")
            else:
                loss.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return loss, terms

    monkeypatch.setattr(ColorizationLoss, phase, poisoned)
    what = f"{network} loss" if poison == "loss" else f"{network} gradients; the loss is finite"
    with pytest.raises(NonFiniteLossError, match=rf"step 3: non-finite {what}.* last good state \(step 2\)"):
        train(tiny_config(tmp_path, steps=4))
    saved = list_checkpoints(tmp_path)[-1]
    assert saved.name == "checkpoint-00000002.safetensors"
    floats = [value for value in checkpoint_tensors(saved).values() if isinstance(value, torch.Tensor) and value.is_floating_point()]
    assert floats and all(bool(value.isfinite().all()) for value in floats)
    assert_same_checkpoint(saved, two.checkpoint)


def test_ctrl_c_saves_after_the_current_step(reference_runs, tmp_path, ctrl_c_at_step_2):
    two, _ = reference_runs
    result = train(tiny_config(tmp_path, steps=4, checkpoint_every=10))
    assert result.stopped_early == "interrupted" and result.step == 2
    assert_same_checkpoint(result.checkpoint, two.checkpoint)


def test_ctrl_c_during_the_final_save_does_not_stop_it(reference_runs, tmp_path, monkeypatch):
    two, _ = reference_runs
    save_checkpoint = train_module.save_checkpoint

    def interrupted_save(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return save_checkpoint(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", interrupted_save)
    try:
        result = train(tiny_config(tmp_path, steps=2, checkpoint_every=10))  # the final save is the only one
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C during the final save interrupted it")
    assert result.step == 2 and result.checkpoint.is_file()
    assert_same_checkpoint(result.checkpoint, two.checkpoint)
