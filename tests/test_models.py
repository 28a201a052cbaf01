"""The colorization networks: shapes at every SCFT resolution, SCFT's math and token order, the
encoders' feature concatenation, the discriminator's spectral norm and VGG19 loading."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sketchcolor.models import (
    LOSS_LAYERS,
    SCFT,
    FeatureEncoder,
    Generator,
    ModelConfig,
    PatchDiscriminator,
    VGGFeatures,
    to_tokens,
    vgg19_features,
)
from sketchcolor.models.discriminator import min_input_side

pytestmark = pytest.mark.usefixtures("one_thread")


# Narrow networks keep these tests fast; the structure is the paper's at any width.
WIDTH = 2


@pytest.mark.parametrize("scft_stride", [16, 8, 4])
@pytest.mark.parametrize("size", [64, 128])
def test_generator_and_discriminator_shapes(size, scft_stride):
    config = ModelConfig(width=WIDTH, scft_stride=scft_stride, residual_blocks=1, disc_width=8)
    generator = Generator(config, attn_impl="reference")
    sketch, reference = torch.rand(2, 1, size, size) * 2 - 1, torch.rand(2, 3, size, size) * 2 - 1
    output = generator(sketch, reference)
    tokens = (size // scft_stride) ** 2
    assert config.feature_dim == 62 * WIDTH
    assert output.image.shape == (2, 3, size, size)
    assert output.query.shape == (2, tokens, config.feature_dim)
    assert output.key.shape == (2, tokens, config.feature_dim)
    assert output.image.abs().max() <= 1  # tanh output
    scores = PatchDiscriminator(config)(sketch, output.image)
    # Three stride-2 4x4 convs, then two stride-1 4x4 convs with padding 1.
    patches = size // 8 - 2
    assert scores.shape == (2, 1, patches, patches)


def test_paper_config_has_992_features():
    config = ModelConfig()
    assert config.encoder_channels == (16, 16, 32, 32, 64, 64, 128, 128, 256, 256)
    assert config.feature_dim == 992
    encoder = FeatureEncoder(3, config)
    strides = [layer[0].stride[0] for layer in encoder.layers]
    assert strides == [1, 1, 2, 1, 2, 1, 2, 1, 2, 1]  # stride 2 at layers 3, 5, 7, 9


@pytest.mark.parametrize("scft_stride", [16, 8, 4])
def test_encoder_resizes_every_layer_to_the_scft_grid(scft_stride):
    config = ModelConfig(width=WIDTH, scft_stride=scft_stride)
    encoder = FeatureEncoder(1, config).eval()
    image = torch.rand(1, 1, 64, 48)
    encoding = encoder(image)
    grid = (64 // scft_stride, 48 // scft_stride)
    assert encoding.features.shape == (1, config.feature_dim, *grid)
    assert [a.shape[1] for a in encoding.activations] == list(config.encoder_channels)
    first, last = encoding.activations[0], encoding.activations[-1]
    channels = config.encoder_channels
    # The first layer (full resolution) is average-pooled over scft_stride x scft_stride blocks.
    expected_first = first.reshape(1, channels[0], grid[0], scft_stride, grid[1], scft_stride).mean(dim=(3, 5))
    torch.testing.assert_close(encoding.features[:, : channels[0]], expected_first)
    # The last layer (1/16) is itself at 1/16, upsampled bilinearly otherwise.
    expected_last = last if scft_stride == 16 else F.interpolate(last, size=grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(encoding.features[:, -channels[-1] :], expected_last)


def test_to_tokens_is_row_major_over_positions():
    feature_map = torch.randn(2, 5, 3, 4)
    tokens = to_tokens(feature_map)
    assert tokens.shape == (2, 12, 5)
    for y in range(3):
        for x in range(4):
            torch.testing.assert_close(tokens[:, y * 4 + x], feature_map[:, :, y, x])


@pytest.mark.parametrize("attn_impl", ["reference", "cpp"])
def test_scft_matches_its_definition(attn_impl):
    # c = vs + softmax(Q K^T / sqrt(D)) V, written position by position on the feature maps
    # (no reshape), in float64: catches a missing permute and a scale applied after the softmax.
    dim = 24
    scft = SCFT(dim, attn_impl=attn_impl).double()
    sketch, reference = torch.randn(2, dim, 3, 4, dtype=torch.float64), torch.randn(2, dim, 2, 5, dtype=torch.float64)
    output = scft(sketch, reference)
    weight = {name: (getattr(scft, name).weight, getattr(scft, name).bias) for name in ("query", "key", "value")}
    assert weight["key"][1] is None  # a key bias would shift whole rows of scores: it has no effect

    def project(name, fmap):
        projected = torch.einsum("oc,bchw->bhwo", weight[name][0], fmap)
        return projected if weight[name][1] is None else projected + weight[name][1]

    query, key, value = project("query", sketch), project("key", reference), project("value", reference)
    scores = torch.einsum("bhwd,bpqd->bhwpq", query, key) / math.sqrt(dim)
    probabilities = torch.softmax(scores.flatten(3), dim=-1).reshape(scores.shape)
    attended = torch.einsum("bhwpq,bpqd->bdhw", probabilities, value)
    torch.testing.assert_close(output.features, sketch + attended)
    torch.testing.assert_close(output.query, query.flatten(1, 2))
    torch.testing.assert_close(output.key, key.flatten(1, 2))


def test_generator_backends_agree():
    config = ModelConfig(width=WIDTH, scft_stride=4, residual_blocks=1)
    generator = Generator(config, attn_impl="reference").eval()
    sketch, reference = torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 48)
    expected = generator(sketch, reference).image
    generator.scft.attn_impl = "cpp"
    torch.testing.assert_close(generator(sketch, reference).image, expected, atol=1e-5, rtol=1e-4)


def test_reference_may_differ_in_size_from_sketch():
    generator = Generator(ModelConfig(width=WIDTH, scft_stride=8, residual_blocks=1), attn_impl="reference")
    output = generator(torch.rand(1, 1, 32, 48), torch.rand(1, 3, 64, 16))
    assert output.image.shape == (1, 3, 32, 48)
    assert output.query.shape[1] == 4 * 6 and output.key.shape[1] == 8 * 2


def test_bad_inputs_name_the_argument():
    generator = Generator(ModelConfig(width=WIDTH, residual_blocks=1), attn_impl="reference")
    with pytest.raises(ValueError, match="sketch must have shape"):
        generator(torch.rand(1, 1, 30, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="reference must have shape"):
        generator(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="same batch size"):
        generator(torch.rand(2, 1, 32, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="scft_stride"):
        ModelConfig(scft_stride=2)
    with pytest.raises(ValueError, match="width"):
        ModelConfig(width=0)


def test_discriminator_uses_spectral_norm_on_every_conv():
    discriminator = PatchDiscriminator(ModelConfig(disc_width=8))
    convs = [module for module in discriminator.modules() if isinstance(module, torch.nn.Conv2d)]
    assert len(convs) == 5
    assert all(hasattr(conv, "parametrizations") and "weight" in conv.parametrizations for conv in convs)
    with pytest.raises(ValueError, match="must agree"):
        discriminator(torch.rand(1, 1, 32, 32), torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("disc_layers", [1, 2, 3, 4, 6])
def test_discriminator_min_input_side_is_the_smallest_it_takes(disc_layers):
    config = ModelConfig(width=WIDTH, disc_width=2, disc_layers=disc_layers)
    discriminator = PatchDiscriminator(config)
    side = min_input_side(config)
    assert discriminator(torch.rand(1, 1, side, side), torch.rand(1, 3, side, side)).shape == (1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        discriminator(torch.rand(1, 1, side - 1, side - 1), torch.rand(1, 3, side - 1, side - 1))


# torchvision's vgg19().features: a conv at each of these indices (ReLUs and max pools between).
TORCHVISION_VGG19_CONVS = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


def test_vgg19_layout_matches_torchvision():
    features = vgg19_features()
    assert len(features) == 37
    expected = {f"{i}.{name}" for i in TORCHVISION_VGG19_CONVS for name in ("weight", "bias")}
    assert set(features.state_dict()) == expected
    assert [i for i in range(37) if isinstance(features[i], torch.nn.MaxPool2d)] == [4, 9, 18, 27, 36]
    assert features[34].weight.shape == (512, 512, 3, 3)
    # relu1_1 ... relu5_1
    assert LOSS_LAYERS == (1, 6, 11, 20, 29)
    assert all(isinstance(features[i], torch.nn.ReLU) for i in LOSS_LAYERS)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vgg_loads_a_torchvision_state_dict(tmp_path, suffix):
    source = vgg19_features()
    state = {f"features.{key}": value.clone() for key, value in source.state_dict().items()}
    state["classifier.0.weight"] = torch.randn(4, 3)  # ignored, like the rest of torchvision's classifier
    path = tmp_path / f"vgg19{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    vgg = VGGFeatures.from_file(path)
    torch.testing.assert_close(vgg.features[28].weight, source[28].weight)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    activations = vgg(image)
    assert [a.shape[1] for a in activations] == [64, 128, 256, 512, 512]
    normalized = ((image + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(activations[0], F.relu(source[0](normalized)))
    assert not any(p.requires_grad for p in vgg.parameters())


def test_vgg_rejects_other_files(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.randn(2)}, path)
    with pytest.raises(ValueError, match="no 'features"):
        VGGFeatures.from_file(path)
    torch.save({"features.0.weight": torch.randn(2)}, path)
    with pytest.raises(ValueError, match="not a torchvision vgg19"):
        VGGFeatures.from_file(path)
    torch.save({"features.0.weight": torch.randn(64, 3, 3, 3)}, path)  # the right shape, the other keys missing
    with pytest.raises(ValueError, match="(?s)not a torchvision vgg19.*Missing key"):
        VGGFeatures.from_file(path)
    with pytest.raises(FileNotFoundError, match="vgg_weights"):
        VGGFeatures.from_file(tmp_path / "missing.pth")


@pytest.mark.parametrize("damage", ["junk .pth", "junk .safetensors", "truncated .pth"])
def test_vgg_names_a_file_it_cannot_read(tmp_path, damage):
    path = tmp_path / f"vgg19{damage.split()[1]}"
    if damage == "truncated .pth":
        torch.save({f"features.{key}": value for key, value in vgg19_features()[:3].state_dict().items()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"not a state dict\n")
    with pytest.raises(ValueError, match=f"vgg_weights {re.escape(repr(str(path)))} cannot be read"):
        VGGFeatures.from_file(path)
