"""The training objective: L1 + correspondence triplet + adversarial + perceptual + style.

``ColorizationLoss.run_D`` and ``run_G`` each return one phase's loss for one (micro-)batch,
in the manner of StyleGAN's training/loss.py: the loop does the backward passes and the
optimizer steps and never looks inside.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .correspondence_match import within_one_rate
from .models import Generator, PatchDiscriminator, VGGFeatures
from .models.config import ConfigFieldError

GAN_LOSSES = ("lsgan", "hinge", "standard")
NEGATIVE_MODES = ("sampled", "hardest")


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and options. The defaults are the paper's (DESIGN.md, "Model") except the
    adversarial objective: the paper's is the conditional GAN's log loss, gan_loss="standard"; the
    default is "lsgan", with which the project's demo results were measured."""

    l1_weight: float = field(default=30.0, metadata={"help": "weight of the L1 distance to the ground truth"})
    correspondence_weight: float = field(default=1.0, metadata={"help": "weight of the SCFT correspondence triplet loss"})
    adversarial_weight: float = field(default=1.0, metadata={"help": "weight of the generator's adversarial loss"})
    perceptual_weight: float = field(default=0.01, metadata={"help": "weight of the VGG19 perceptual loss (needs --vgg-weights)"})
    style_weight: float = field(default=50.0, metadata={"help": "weight of the VGG19 Gram-matrix style loss (needs --vgg-weights)"})
    triplet_margin: float = field(default=12.0, metadata={"help": "margin of the triplet loss, on scaled dot products q.k/sqrt(D)"})
    negatives: str = field(default="sampled", metadata={"help": "triplet negatives: 'sampled' (random reference cells) or 'hardest' (best-scoring cell away from the true one)", "choices": NEGATIVE_MODES})
    num_negatives: int = field(default=32, metadata={"help": "sampled negatives per sketch cell (negatives='sampled')"})
    gan_loss: str = field(default="lsgan", metadata={"help": "adversarial objective: 'lsgan' (least squares), 'hinge', or 'standard' (the paper's log loss, non-saturating for G); the other loss defaults are the paper's", "choices": GAN_LOSSES})

    def __post_init__(self) -> None:
        for name in ("l1_weight", "correspondence_weight", "adversarial_weight", "perceptual_weight", "style_weight", "triplet_margin"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
                raise ConfigFieldError(name, f"must be a finite non-negative number, got {value!r}")
        if self.negatives not in NEGATIVE_MODES:
            raise ConfigFieldError("negatives", f"must be one of {NEGATIVE_MODES}, got {self.negatives!r}")
        if not (isinstance(self.num_negatives, int) and not isinstance(self.num_negatives, bool) and self.num_negatives >= 1):
            raise ConfigFieldError("num_negatives", f"must be a positive int, got {self.num_negatives!r}")
        if self.gan_loss not in GAN_LOSSES:
            raise ConfigFieldError("gan_loss", f"must be one of {GAN_LOSSES}, got {self.gan_loss!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def discriminator_adversarial_loss(gan_loss: str, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss for GAN_LOSSES ``gan_loss`` on its scores of real and fake pairs."""
    if gan_loss == "lsgan":
        return 0.5 * ((real_scores - 1).square().mean() + fake_scores.square().mean())
    if gan_loss == "hinge":
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    # Binary cross-entropy on the logits: -log sigmoid(real) - log(1 - sigmoid(fake)).
    return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()


def generator_adversarial_loss(gan_loss: str, fake_scores: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss for GAN_LOSSES ``gan_loss`` on the discriminator's scores
    of its fakes."""
    if gan_loss == "lsgan":
        return (fake_scores - 1).square().mean()
    if gan_loss == "hinge":
        return -fake_scores.mean()
    # The non-saturating form, -log sigmoid(fake): log(1 - sigmoid(fake)) has vanishing gradients
    # while D rejects the fakes confidently, early in training.
    return F.softplus(-fake_scores).mean()


def sample_negatives(pos: torch.Tensor, num_keys: int, count: int) -> torch.Tensor:
    """``count`` random key indices per query (B, N, count), never the query's own ``pos``.

    Drawn on the CPU from torch's global generator (so a resumed run draws the same ones) by
    sampling from the ``num_keys - 1`` other keys and skipping over the positive.
    """
    if num_keys < 2:
        raise ValueError(f"sampled negatives need at least 2 reference cells, got {num_keys}")
    draws = torch.randint(num_keys - 1, (*pos.shape, count)).to(pos.device)
    return draws + (draws >= pos.unsqueeze(-1)).long()


def correspondence_term_count(pos: torch.Tensor, key_grid: tuple[int, int], hardest: bool, exclusion: int) -> torch.Tensor:
    """How many terms the correspondence loss averages over for ``pos`` (B, N), up to a factor
    equal in every batch (the number of sampled negatives per cell): cells with a reference cell
    (``pos >= 0``), and for hardest negatives only those with some key cell more than
    ``exclusion`` cells away (Chebyshev) on ``key_grid``, as ``ops.correspondence_loss`` counts."""
    valid = pos >= 0
    if hardest:
        height, width = key_grid
        row, column = pos.clamp_min(0) // width, pos.clamp_min(0) % width
        farthest = torch.maximum(torch.maximum(row, height - 1 - row), torch.maximum(column, width - 1 - column))
        valid &= farthest > exclusion
    return valid.sum()


def gram_matrix(activation: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C) channel correlations, normalized by C * H * W, in float32.

    Outside autocast, which would cast the product back to bfloat16: the style loss is a
    difference of two Gram matrices, and bfloat16's 8 bits lose most of it."""
    batch, channels, height, width = activation.shape
    with torch.autocast(activation.device.type, enabled=False):
        flat = activation.float().reshape(batch, channels, height * width)
        return flat @ flat.transpose(1, 2) / (channels * height * width)


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module):
    """Puts ``module``'s buffers back as they were after the block. The D phase's generator pass
    and the G phase's see the same weights and batch, so batch norm would otherwise fold the same
    statistics into its running ones twice per step (momentum 0.19 instead of 0.1)."""
    saved = [buffer.clone() for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)


class ColorizationLoss:
    """Both phases' losses for a generator, a conditional discriminator and an optional VGG.

    Batches are dicts of the data pipeline ("sketch", "reference", "ground_truth", "pos") on
    the models' device. Without ``vgg`` the perceptual and style terms are left out.
    ``attn_impl`` is the training run's ops backend, used here for the correspondence loss (the
    generator's SCFT has its own copy).
    """

    # The half-width of the window around pos that the hardest negative stays out of: the op's
    # default, which _correspondence leaves as it is.
    HARDEST_EXCLUSION = 1

    def __init__(
        self,
        generator: Generator,
        discriminator: PatchDiscriminator,
        config: LossConfig = LossConfig(),
        vgg: VGGFeatures | None = None,
        attn_impl: str = "auto",
    ) -> None:
        self.generator, self.discriminator, self.config, self.vgg = generator, discriminator, config, vgg
        self.attn_impl = attn_impl
        self.scft_stride = generator.config.scft_stride

    def weigh_micro_batches(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Adds to each of one step's micro-batches its "correspondence_share", the factor that
        ``run_G`` applies to its correspondence loss.

        That loss is a mean over the valid terms, and micro-batches (and ranks) hold different
        numbers of them; the loop averages the micro-batches' losses, and DDP the ranks'. Micro-
        batch j's mean times parts * n_j / sum(n), over ``parts`` micro-batches of all ranks,
        averages to sum(terms) / sum(n): the mean over the whole step's batch, as one batch
        would give."""
        if not self.config.correspondence_weight:
            return
        counts = [self._correspondence_term_count(batch) for batch in micro_batches]
        total, parts = self._step_totals(torch.stack(counts).sum(), len(micro_batches))
        for batch, count in zip(micro_batches, counts):
            batch["correspondence_share"] = count * parts / total.clamp_min(1)

    def _step_totals(self, count: torch.Tensor, parts: int) -> tuple[torch.Tensor, int]:
        """The step's term count and number of micro-batches, from this process's."""
        return count, parts

    def _correspondence_term_count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        key_grid = self._feature_grid(batch["reference"])
        return correspondence_term_count(batch["pos"], key_grid, self.config.negatives == "hardest", self.HARDEST_EXCLUSION)

    def _feature_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """SCFT's grid of cells (h, w) for images (B, C, H, W): its keys' for references, its
        queries' for sketches."""
        return images.shape[-2] // self.scft_stride, images.shape[-1] // self.scft_stride

    def run_D(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss on real (sketch, ground truth) and fake (sketch, G's output) pairs
        (the generator runs without gradients), and its mean scores on each, detached."""
        sketch = batch["sketch"]
        with torch.no_grad(), _buffers_kept(self.generator):
            fake = self.generator(sketch, batch["reference"]).image
        real_scores = self.discriminator(sketch, batch["ground_truth"]).float()
        fake_scores = self.discriminator(sketch, fake.detach()).float()
        loss = discriminator_adversarial_loss(self.config.gan_loss, real_scores, fake_scores)
        return loss, {"D/real": real_scores.mean().detach(), "D/fake": fake_scores.mean().detach()}

    def run_G(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the generator's terms, and each term (unweighted, detached); terms of
        weight 0 are not computed. The correspondence term is scaled by the batch's
        "correspondence_share" where ``weigh_micro_batches`` gave it one. Beside the terms,
        "SCFT/within_one": how often SCFT's best-scoring reference cell is within one cell of the
        true one (``correspondence_match.within_one_rate``), whatever the loss weights; the loop
        averages it over micro-batches and processes like the terms (batches of one size, in
        which nearly every cell of an augmented-self pair has a true cell)."""
        config = self.config
        sketch, reference, ground_truth = batch["sketch"], batch["reference"], batch["ground_truth"]
        output = self.generator(sketch, reference)
        pos = batch["pos"]
        if pos.shape != output.query.shape[:2]:
            raise ValueError(
                f"pos must have shape (B, N) = {tuple(output.query.shape[:2])} (one entry per SCFT sketch cell), got "
                f"{tuple(pos.shape)}; the data's feature_grid must be size / scft_stride"
            )
        fake = output.image.float()
        terms: dict[str, torch.Tensor] = {
            "SCFT/within_one": within_one_rate(output.query, output.key, pos, self._feature_grid(sketch), self._feature_grid(reference))
        }
        loss = fake.new_zeros(())

        def add(name: str, weight: float, value: torch.Tensor) -> None:
            nonlocal loss
            loss = loss + weight * value
            terms[f"G/{name}"] = value.detach()

        if config.l1_weight:
            add("l1", config.l1_weight, (fake - ground_truth).abs().mean())
        if config.correspondence_weight:
            correspondence = self._correspondence(output.query, output.key, pos, reference)
            add("correspondence", config.correspondence_weight, correspondence * batch.get("correspondence_share", 1))
        if config.adversarial_weight:
            scores = self.discriminator(sketch, output.image).float()
            add("adversarial", config.adversarial_weight, generator_adversarial_loss(config.gan_loss, scores))
        if self.vgg is not None and (config.perceptual_weight or config.style_weight):
            fake_features = self.vgg(output.image)
            with torch.no_grad():
                real_features = self.vgg(ground_truth)
            if config.perceptual_weight:
                perceptual = sum((f.float() - r.float()).abs().mean() for f, r in zip(fake_features, real_features))
                add("perceptual", config.perceptual_weight, perceptual)
            if config.style_weight:
                style = sum((gram_matrix(f) - gram_matrix(r)).abs().mean() for f, r in zip(fake_features, real_features))
                add("style", config.style_weight, style)
        return loss, terms

    def _correspondence(self, query: torch.Tensor, key: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Triplet loss on SCFT's own Q and K: a sketch cell must score its true reference cell
        (``pos``, from the data's warp) above the negatives by the margin."""
        config = self.config
        # Under autocast q and k are bfloat16 (the cuda kernels take no float32); every backend of
        # the op, the reference included, scores them in float32: the margin is a difference of
        # dot products.
        if config.negatives == "hardest":
            return ops.correspondence_loss(
                query, key, pos, margin=config.triplet_margin, hardest=True, key_grid=self._feature_grid(reference), impl=self.attn_impl
            )
        negatives = sample_negatives(pos, key.shape[1], config.num_negatives)
        return ops.correspondence_loss(query, key, pos, neg=negatives, margin=config.triplet_margin, impl=self.attn_impl)
