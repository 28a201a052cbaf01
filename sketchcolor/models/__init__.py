"""The colorization networks (DESIGN.md, "Model")."""

from .config import SCFT_STRIDES, SIZE_MULTIPLE, ModelConfig
from .decoder import UNetDecoder
from .discriminator import PatchDiscriminator
from .encoder import EncoderOutput, FeatureEncoder
from .generator import Generator, GeneratorOutput, ResidualBlock
from .scft import SCFT, SCFTOutput, to_tokens
from .vgg import LOSS_LAYERS, VGGFeatures, vgg19_features

__all__ = [
    "LOSS_LAYERS",
    "SCFT",
    "SCFT_STRIDES",
    "SIZE_MULTIPLE",
    "EncoderOutput",
    "FeatureEncoder",
    "Generator",
    "GeneratorOutput",
    "ModelConfig",
    "PatchDiscriminator",
    "ResidualBlock",
    "SCFTOutput",
    "UNetDecoder",
    "VGGFeatures",
    "to_tokens",
    "vgg19_features",
]
