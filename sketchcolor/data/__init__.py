"""Images -> (sketch, augmented-self reference, ground truth, correspondence) training pairs.

``make_dataset(None, ...)`` gives the built-in procedural shapes, ``make_dataset(DIR, ...)``
any folder of images; ``python -m sketchcolor.data.preview --out preview.png`` shows samples.
"""

from .color import ColorPerturbation
from .dataset import DEFAULT_PROCEDURAL_LENGTH, PairConfig, PairDataset, item_generator, make_dataset
from .folder import IMAGE_SUFFIXES, ImageFolder, UnreadableImageWarning
from .images import UnreadableImageError, load_rgb_image, pil_to_tensor, tensor_to_pil
from .procedural import ProceduralShapes
from .warp import TPSParams, TPSWarp, cell_centers, fit_tps
from .xdog import XDoGParams, extract_sketch_file, xdog

__all__ = [
    "DEFAULT_PROCEDURAL_LENGTH",
    "IMAGE_SUFFIXES",
    "ColorPerturbation",
    "ImageFolder",
    "PairConfig",
    "PairDataset",
    "ProceduralShapes",
    "TPSParams",
    "TPSWarp",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "XDoGParams",
    "cell_centers",
    "extract_sketch_file",
    "fit_tps",
    "item_generator",
    "load_rgb_image",
    "make_dataset",
    "pil_to_tensor",
    "tensor_to_pil",
    "xdog",
]
