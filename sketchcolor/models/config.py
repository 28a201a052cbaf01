"""Sizes of the colorization networks; stored in every checkpoint so a model can be rebuilt."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Channels of the encoders' 10 conv layers in units of ``width`` (the paper's 16, 16, 32, 32,
# 64, 64, 128, 128, 256, 256 at width 16), and the downsampling factor after each layer: stride 2
# at layers 3, 5, 7 and 9.
ENCODER_CHANNEL_MULTIPLES = (1, 1, 2, 2, 4, 4, 8, 8, 16, 16)
ENCODER_LAYER_STRIDES = (1, 1, 2, 2, 4, 4, 8, 8, 16, 16)
# Image sides must be a multiple of the encoders' total downsampling.
SIZE_MULTIPLE = ENCODER_LAYER_STRIDES[-1]
SCFT_STRIDES = (16, 8, 4)


class ConfigFieldError(ValueError):
    """A config field's value is not one it can take. ``field`` names it, so that the command
    line can name its flag instead (--l1-weight for l1_weight); the message is the field's name
    and ``problem``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _positive_int(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigFieldError(name, f"must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Generator and discriminator sizes. The defaults are the paper's architecture."""

    width: int = field(default=16, metadata={"help": "channels of the encoders' first layers; the 10 layers have width x (1,1,2,2,4,4,8,8,16,16) channels and the SCFT feature dimension is 62 x width (992 at the paper's 16)"})
    scft_stride: int = field(default=16, metadata={"help": "input side / SCFT feature side: 16 (paper), 8 or 4 (more tokens, finer correspondence)", "choices": SCFT_STRIDES})
    residual_blocks: int = field(default=4, metadata={"help": "residual blocks between SCFT and the decoder"})
    disc_width: int = field(default=64, metadata={"help": "channels of the discriminator's first layer (doubling per layer, at most 8x)"})
    disc_layers: int = field(default=3, metadata={"help": "stride-2 layers of the PatchGAN discriminator (3 gives 70x70 patches)"})

    def __post_init__(self) -> None:
        for name in ("width", "residual_blocks", "disc_width", "disc_layers"):
            _positive_int(name, getattr(self, name))
        if self.scft_stride not in SCFT_STRIDES:
            raise ConfigFieldError("scft_stride", f"must be one of {SCFT_STRIDES}, got {self.scft_stride!r}")

    @property
    def encoder_channels(self) -> tuple[int, ...]:
        return tuple(self.width * multiple for multiple in ENCODER_CHANNEL_MULTIPLES)

    @property
    def feature_dim(self) -> int:
        """D: channels of the concatenated encoder features that SCFT attends over."""
        return sum(self.encoder_channels)

    def feature_grid(self, size: int) -> int:
        """Cells per side of the SCFT feature map for an input of side ``size``."""
        return size // self.scft_stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        unknown = set(values) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"model config has unknown fields {sorted(unknown)}")
        return cls(**values)
