"""VGG19 features for the perceptual and style losses, loadable from a torchvision state dict.

torchvision cannot be installed here, so the ``features`` Sequential of torchvision's vgg19 is
rebuilt with the same layer indices: the ``features.<i>.weight`` / ``features.<i>.bias`` keys
of a torchvision checkpoint (``vgg19-dcbb9e9d.pth``, or the same tensors saved as safetensors)
load into it unchanged. Weights are never downloaded; the user gives the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# torchvision's configuration "E": conv output channels, "M" a 2x2 max pool.
_VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# Indices in ``features`` of relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1: the layers whose
# activations the perceptual and style losses compare (as in Lee et al.).
LOSS_LAYERS = (1, 6, 11, 20, 29)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PREFIX = "features."


def vgg19_features() -> nn.Sequential:
    """torchvision's ``vgg19().features`` layer for layer (37 modules), randomly initialized."""
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in _VGG19_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = entry
    return nn.Sequential(*layers)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a pickled checkpoint cannot run code while it is read.
            state = torch.load(path, map_location="cpu", weights_only=True)
    # A file that is not what its name says fails with a different error type in each reader
    # (KeyError, pickle's UnpicklingError, a zip RuntimeError, SafetensorError, ...).
    except Exception as error:
        raise ValueError(f"vgg_weights {str(path)!r} cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"vgg_weights {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


class VGGFeatures(nn.Module):
    """Frozen VGG19 activations at ``LOSS_LAYERS`` of images in [-1, 1] (ImageNet-normalized inside)."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        # Only the layers up to the deepest one used are kept.
        self.features = features[: max(LOSS_LAYERS) + 1]
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path) -> VGGFeatures:
        """Load a torchvision-format VGG19 state dict (.pth/.pt via torch.load(weights_only=True),
        or .safetensors); only its ``features.*`` entries are used."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vgg_weights {str(path)!r} is not a file")
        state = _read_state_dict(path)
        features_state = {key[len(_PREFIX):]: value for key, value in state.items() if isinstance(key, str) and key.startswith(_PREFIX)}
        if not features_state:
            raise ValueError(
                f"vgg_weights {str(path)!r} has no 'features.*' entries; expected a torchvision vgg19 state dict"
            )
        features = vgg19_features()
        try:
            features.load_state_dict(features_state)
        except RuntimeError as error:
            raise ValueError(f"vgg_weights {str(path)!r} is not a torchvision vgg19 state dict: {error}") from error
        return cls(features)

    def train(self, mode: bool = True) -> VGGFeatures:
        # Always in eval mode: it is a fixed feature extractor.
        return super().train(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = ((image + 1) / 2 - self.mean) / self.std
        activations = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in LOSS_LAYERS:
                activations.append(x)
        return activations
