"""The data pipeline: XDoG sketches, appearance transform, image sources, training pairs, preview.
(The TPS warp and its correspondence, also inside dataset items, are tested in test_data_warp.py.)"""

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sketchcolor.data import (
    ColorPerturbation,
    ImageFolder,
    PairConfig,
    PairDataset,
    ProceduralShapes,
    TPSParams,
    UnreadableImageWarning,
    XDoGParams,
    cell_centers,
    extract_sketch_file,
    load_rgb_image,
    make_dataset,
    pil_to_tensor,
    xdog,
)
from sketchcolor import cli
from sketchcolor.data import preview


pytestmark = pytest.mark.usefixtures("one_thread")


def square_image(size: int = 64, inside=(200, 40, 40), outside=(230, 230, 120)) -> Image.Image:
    """A flat background with a flat square from size/4 to 3 size/4: edges only on the square."""
    array = np.empty((size, size, 3), dtype=np.uint8)
    array[:] = outside
    array[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = inside
    return Image.fromarray(array)


# --- XDoG -------------------------------------------------------------------------------------


def test_xdog_draws_lines_at_edges_and_nothing_on_flat_areas():
    size = 64
    sketch = xdog(pil_to_tensor(square_image(size)))
    assert sketch.shape == (1, size, size) and sketch.dtype == torch.float32
    assert sketch.min() >= 0 and sketch.max() <= 1
    dark = sketch[0] < 0.5
    edges = torch.zeros(size, size, dtype=torch.bool)
    low, high = size // 4, 3 * size // 4
    band = 4  # a line a few pixels wide on the darker side of each edge
    edges[low - band : high + band, low - band : high + band] = True
    edges[low + band : high - band, low + band : high - band] = False
    assert not dark[~edges].any(), "lines away from the square's edges"
    # Every stretch of the square's outline is drawn.
    for offset in range(low, high):
        for across in (dark[low - band : low + band, offset], dark[high - band : high + band, offset]):
            assert across.any()
        for across in (dark[offset, low - band : low + band], dark[offset, high - band : high + band]):
            assert across.any()


def test_xdog_flat_images_are_blank_and_image_borders_are_not_edges():
    for color in ((128, 128, 128), (20, 200, 90), (255, 255, 255)):
        flat = pil_to_tensor(Image.new("RGB", (40, 32), color))
        assert torch.equal(xdog(flat), torch.ones(1, 32, 40))


def test_xdog_sigma_sets_line_width_and_batches_and_gray_inputs_work():
    image = pil_to_tensor(square_image(64))
    thin = (xdog(image, XDoGParams(sigma=0.3)) < 0.5).sum()
    thick = (xdog(image, XDoGParams(sigma=1.0)) < 0.5).sum()
    assert thick > thin
    batch = torch.stack([image, image.flip(-1)])
    sketches = xdog(batch)
    assert sketches.shape == (2, 1, 64, 64)
    torch.testing.assert_close(sketches[0], xdog(image))
    gray = pil_to_tensor(square_image(64).convert("L"))
    assert gray.shape == (1, 64, 64)
    assert (xdog(gray) < 0.5).sum() > 0


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"sigma": 0}, "sigma"),
        ({"k": 1.0}, "k"),
        ({"p": -1}, "p"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"phi": 0}, "phi"),
        # Non-finite, subnormal and beyond float32 (the filter's dtype), each of which used to
        # crash the filter or give a NaN sketch, saved as black.
        ({"sigma": 1e-320}, "sigma"),
        ({"sigma": 1e-4}, "sigma"),
        ({"sigma": math.inf}, "sigma"),
        ({"sigma": math.nan}, "sigma"),
        ({"k": math.inf}, "k"),
        ({"k": math.nan}, "k"),
        ({"p": math.inf}, "p"),
        ({"p": 1e39}, "p"),
        ({"p": math.nan}, "p"),
        ({"epsilon": -math.inf}, "epsilon"),
        ({"phi": math.inf}, "phi"),
    ],
)
def test_bad_xdog_params_name_the_argument(arguments, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        XDoGParams(**arguments)


def test_the_smallest_xdog_sigma_draws_and_the_command_line_names_a_bad_parameter(tmp_path, capsys):
    image = pil_to_tensor(square_image(32))
    # Both Gaussians narrower than a pixel: no blur, no difference of Gaussians, blank paper.
    assert torch.equal(xdog(image, XDoGParams(sigma=1e-3)), torch.ones(1, 32, 32))
    square_image(32).save(tmp_path / "in.png")
    for option, value in (("--k", "inf"), ("--p", "inf"), ("--sigma", "1e-320")):
        assert cli.main(["sketch", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), option, value]) == 2
        assert f"sketchcolor sketch: error: {option[2:]} must be" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_xdog_rejects_a_blur_far_wider_than_the_image(tmp_path, capsys):
    # The blur pads the image by its radius: sigma 1e12 asked for terabytes, 1e30 overflowed.
    # The radius 4 * sigma * k may reach max(64, the longer side): 100 pixels here.
    image = torch.rand(3, 40, 100)
    assert xdog(image, XDoGParams(sigma=5.0, k=5.0)).shape == (1, 40, 100)
    with pytest.raises(ValueError, match="sigma \\* k = 25.5 pixels .* 100x40 image: its radius 4 \\* sigma \\* k must be at most max\\(64, the image's longer side\\) = 100 pixels"):
        xdog(image, XDoGParams(sigma=5.1, k=5.0))
    assert xdog(torch.rand(1, 1, 1)).shape == (1, 1, 1)  # the defaults fit any image
    square_image(32).save(tmp_path / "in.png")
    assert cli.main(["sketch", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--sigma", "1e30"]) == 2
    assert "sketchcolor sketch: error: sigma * k = 4.5e+30 pixels (the outer Gaussian) is too wide" in capsys.readouterr().err


def test_xdog_rejects_bad_images():
    with pytest.raises(ValueError, match="image"):
        xdog(torch.rand(4, 16, 16))
    with pytest.raises(ValueError, match="float"):
        xdog(torch.zeros(3, 16, 16, dtype=torch.uint8))


def test_extract_sketch_file_handles_rgb_rgba_and_gray_files(tmp_path):
    rgb = square_image(48)
    rgb.save(tmp_path / "rgb.jpg", quality=95)
    rgb.convert("L").save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (48, 48), (0, 0, 0, 0))  # transparent paper...
    rgba.paste(Image.new("RGBA", (24, 24), (30, 60, 200, 255)), (12, 12))  # ...with an opaque square
    rgba.save(tmp_path / "rgba.png")
    for name in ("rgb.jpg", "gray.png", "rgba.png"):
        extract_sketch_file(tmp_path / name, tmp_path / f"{name}.sketch.png", sigma=0.5)
        sketch = Image.open(tmp_path / f"{name}.sketch.png")
        assert sketch.mode == "L" and sketch.size == (48, 48)
        values = np.asarray(sketch)
        assert values[0, 0] == 255 and values[24, 24] == 255  # flat paper and flat inside stay white
        assert (values[10:14, 12:36] < 128).any()  # the square's top edge is drawn
    with pytest.raises(TypeError, match="sigmaa"):
        extract_sketch_file(tmp_path / "rgb.jpg", tmp_path / "out.png", sigmaa=0.5)


# --- appearance transform ---------------------------------------------------------------------


def test_color_perturbation_is_per_channel_seeded_and_in_range():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    perturb = ColorPerturbation(gain=0.2, offset=0.2)
    first = perturb(image, torch.Generator().manual_seed(1))
    assert torch.equal(first, perturb(image, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, perturb(image, torch.Generator().manual_seed(2)))
    assert first.min() >= 0 and first.max() <= 1
    # An affine map per channel: each output channel is gain * input + offset exactly.
    for channel in range(3):
        x, y = image[channel].flatten(), first[channel].flatten()
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        torch.testing.assert_close(y, slope * x + (y.mean() - slope * x.mean()), atol=1e-5, rtol=0)
        assert 0.8 - 1e-6 <= slope <= 1.2 + 1e-6
    with_hue = ColorPerturbation(hue=0.25, saturation=0.3)(image, torch.Generator().manual_seed(1))
    assert with_hue.shape == image.shape and with_hue.min() >= 0 and with_hue.max() <= 1


@pytest.mark.parametrize("name", ["gain", "offset", "hue", "saturation"])
def test_bad_color_ranges_name_the_argument(name):
    with pytest.raises(ValueError, match=f"^{name} "):
        ColorPerturbation(**{name: -0.1})


# --- procedural images ------------------------------------------------------------------------


def test_procedural_images_are_deterministic_varied_and_any_size():
    images = ProceduralShapes(size=64, length=6, seed=3)
    first = images[2]
    assert first.shape == (3, 64, 64) and first.dtype == torch.float32
    assert torch.equal(first, ProceduralShapes(size=64, length=6, seed=3)[2])
    assert not torch.equal(first, images[3])
    assert not torch.equal(first, ProceduralShapes(size=64, length=6, seed=4)[2])
    assert ProceduralShapes(size=40, length=1)[0].shape == (3, 40, 40)
    palettes = []
    for index in range(len(images)):
        pixels = (images[index] * 255).round().to(torch.uint8).reshape(3, -1).T
        colors, counts = torch.unique(pixels // 8, dim=0, return_counts=True)
        regions = colors[counts > pixels.shape[0] // 100]  # flat colours covering >= 1% each
        assert len(regions) >= 3, f"image {index} has {len(regions)} regions"
        palettes.append({tuple(c) for c in regions.tolist()})
    # Colours are drawn per image: no large region colour is shared by all images.
    assert not set.intersection(*palettes)


@pytest.mark.parametrize(
    ("arguments", "name"), [({"size": 4}, "size"), ({"length": 0}, "length"), ({"seed": -1}, "seed")]
)
def test_bad_procedural_arguments_name_the_argument(arguments, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        ProceduralShapes(**{"size": 32, "length": 2, **arguments})


# --- image folder -----------------------------------------------------------------------------


def write_folder(root):
    """A folder with every kind of file the loader must cope with."""
    (root / "nested" / "deeper").mkdir(parents=True)
    square_image(80).save(root / "a_rgb.png")
    square_image(60).resize((90, 60)).save(root / "nested" / "b_wide.JPG", quality=90)
    square_image(70).convert("L").save(root / "nested" / "c_gray.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(root / "nested" / "deeper" / "d_transparent.png")
    square_image(64).save(root / "e.webp")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(root / "f_16bit.png")
    (root / "g_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    good = (root / "a_rgb.png").read_bytes()
    (root / "h_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("not an image")


def test_image_folder_reads_every_image_kind_and_skips_unreadable_ones_with_one_warning(tmp_path):
    write_folder(tmp_path)
    folder = ImageFolder(tmp_path, size=48)
    names = [path.name for path in folder.paths]
    assert names == [
        "a_rgb.png", "e.webp", "f_16bit.png", "g_corrupt.png", "h_truncated.png",
        "b_wide.JPG", "c_gray.png", "d_transparent.png",
    ]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first_pass = [folder[index] for index in range(len(folder))]
        second_pass = [folder[index] for index in range(len(folder))]
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(messages) == 2
    assert any("g_corrupt.png" in m for m in messages) and any("h_truncated.png" in m for m in messages)
    for image in first_pass:
        assert image.shape[0] == 3 and min(image.shape[1:]) == 48 and image.dtype == torch.float32
    assert first_pass[5].shape == (3, 48, 72)  # wide image: shorter side scaled to the size
    gray = first_pass[6]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(first_pass[7], torch.ones(3, 48, 48))  # fully transparent -> white paper
    assert first_pass[2].max() > 0.9  # 16-bit values scaled, not clipped to black
    # Unreadable files are replaced by the next readable one.
    assert torch.equal(first_pass[3], first_pass[5]) and torch.equal(first_pass[4], first_pass[5])
    assert all(torch.equal(a, b) for a, b in zip(first_pass, second_pass))


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolder(tmp_path, size=32)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolder(tmp_path, size=32)
    with pytest.raises(NotADirectoryError, match="missing"):
        ImageFolder(tmp_path / "missing", size=32)
    with pytest.raises(ValueError, match="^size "):
        ImageFolder(tmp_path, size=0)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    folder = ImageFolder(tmp_path, size=32)
    # ValueError, which the command line reports as an error instead of a traceback.
    message = f"^the data folder '{tmp_path}': none of its 1 image files could be read"
    with pytest.warns(UnreadableImageWarning, match="broken.png"), pytest.raises(ValueError, match=message):
        folder[0]


def test_load_rgb_image_composites_transparency_over_white(tmp_path):
    image = Image.new("LA", (8, 8), (0, 0))
    image.putpixel((2, 2), (0, 255))
    image.save(tmp_path / "la.png")
    loaded = np.asarray(load_rgb_image(tmp_path / "la.png"))
    assert loaded.shape == (8, 8, 3)
    assert (loaded[2, 2] == 0).all() and (loaded[0, 0] == 255).all()


def test_a_transparent_colour_key_is_composited_over_white(tmp_path):
    # PNG's tRNS chunk on gray, RGB and 16-bit images: one value is transparent, no alpha channel.
    rgb = np.full((8, 8, 3), 90, dtype=np.uint8)
    rgb[:4] = 0
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    gray = np.full((8, 8), 90, dtype=np.uint8)
    gray[:4] = 7
    Image.fromarray(gray).save(tmp_path / "gray.png", transparency=7)
    deep = np.full((8, 8), 90 * 257, dtype=np.uint16)
    deep[:4] = 7  # scales to the same 8-bit value as 0: the key is matched before scaling
    deep[4, 0] = 0
    Image.fromarray(deep).save(tmp_path / "deep.png", transparency=7)
    for name in ("rgb.png", "gray.png", "deep.png"):
        assert "transparency" in Image.open(tmp_path / name).info
        loaded = np.asarray(load_rgb_image(tmp_path / name))
        assert (loaded[:4] == 255).all(), name  # transparent: white paper, not black
        assert (loaded[5:] == 90).all(), name
    assert (np.asarray(load_rgb_image(tmp_path / "deep.png"))[4, 0] == 0).all()
    # Through the folder source too.
    folder_root = tmp_path / "folder"
    folder_root.mkdir()
    Image.fromarray(rgb).save(folder_root / "keyed.png", transparency=(0, 0, 0))
    item = ImageFolder(folder_root, size=8)[0]
    assert torch.equal(item[:, :4], torch.ones(3, 4, 8))
    assert torch.allclose(item[:, 4:], torch.full((3, 4, 8), 90 / 255))


# --- training pairs ---------------------------------------------------------------------------


def check_item(item, size, grid):
    assert set(item) == {"sketch", "reference", "ground_truth", "pos"}
    for key, channels in (("sketch", 1), ("reference", 3), ("ground_truth", 3)):
        assert item[key].shape == (channels, size, size) and item[key].dtype == torch.float32
        assert item[key].min() >= -1 and item[key].max() <= 1
    assert item["pos"].shape == (grid * grid,) and item["pos"].dtype == torch.int64
    assert ((item["pos"] >= -1) & (item["pos"] < grid * grid)).all()
    assert (item["pos"] >= 0).float().mean() > 0.5


def test_procedural_pairs_have_the_documented_layout():
    dataset = make_dataset(None, size=64, feature_grid=8, seed=0, length=3)
    assert len(dataset) == 3
    check_item(dataset[0], 64, 8)
    with pytest.raises(IndexError):
        dataset[3]


def test_pairs_are_deterministic_per_seed_index_and_epoch():
    def build(seed):
        return make_dataset(None, size=48, feature_grid=4, seed=seed, length=5)

    first, again, other = build(7), build(7), build(8)
    for index in (4, 1, 3):  # any order
        a, b = first[index], again[index]
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(first[1]["ground_truth"], other[1]["ground_truth"])
    before = first[2]
    first.set_epoch(1)
    after = first[2]
    assert not torch.equal(before["reference"], after["reference"])
    first.set_epoch(0)
    assert torch.equal(first[2]["reference"], before["reference"])


def test_dataloader_with_two_workers_gives_the_same_batches():
    dataset = make_dataset(None, size=32, feature_grid=4, seed=5, length=6)
    loader = DataLoader(dataset, batch_size=3, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    for start, batch in zip((0, 3), batches):
        assert batch["sketch"].shape == (3, 1, 32, 32) and batch["pos"].shape == (3, 16)
        for offset in range(3):
            item = dataset[start + offset]
            assert all(torch.equal(batch[key][offset], item[key]) for key in item)


def test_folder_pairs_with_a_length_longer_than_the_folder(tmp_path):
    square_image(80).save(tmp_path / "one.png")
    square_image(50).resize((75, 50)).save(tmp_path / "two.jpg")
    dataset = make_dataset(str(tmp_path), size=48, feature_grid=6, seed=0, length=5)
    assert len(dataset) == 5
    items = [dataset[index] for index in range(5)]
    for item in items:
        check_item(item, 48, 6)
    # Item 2 repeats image 0 with a different augmentation.
    assert not torch.equal(items[0]["reference"], items[2]["reference"])
    assert len(make_dataset(str(tmp_path), size=48, feature_grid=6, seed=0, length=None)) == 2


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"size": 0}, "size"),
        ({"feature_grid": 0}, "feature_grid"),
        ({"feature_grid": 7}, "feature_grid"),
        ({"seed": -3}, "seed"),
        ({"length": 0}, "length"),
    ],
)
def test_bad_dataset_arguments_name_the_argument(arguments, name):
    with pytest.raises(ValueError, match=name):
        make_dataset(**{"data_dir": None, "size": 64, "feature_grid": 8, "seed": 0, "length": 4, **arguments})


def test_bad_pair_config_and_dataset_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="sketch_sigma_range"):
        PairConfig(sketch_sigma_range=(0.5, 0.3))
    # Every sigma drawn from the range must be one XDoGParams takes.
    for sigmas in ((1e-4, 0.5), (0.3, math.inf)):
        with pytest.raises(ValueError, match="^sketch_sigma_range "):
            PairConfig(sketch_sigma_range=sigmas)
    with pytest.raises(ValueError, match="^warp "):
        PairConfig(warp=ColorPerturbation())
    images = ProceduralShapes(32, 2)
    with pytest.raises(ValueError, match="^config "):
        PairDataset(images, config={"size": 32})
    with pytest.raises(ValueError, match="^epoch "):
        PairDataset(images, PairConfig(size=32, feature_grid=4)).set_epoch(-1)
    with pytest.raises(ValueError, match="images must give"):
        PairDataset(images, PairConfig(size=64, feature_grid=4))[0]
    with pytest.raises(NotADirectoryError, match="the data folder .* is not a directory"):
        make_dataset(str(tmp_path / "nowhere"), size=32, feature_grid=4, seed=0, length=None)


def test_custom_augmentation_ranges_reach_the_items():
    image = ProceduralShapes(32, 1)[0]
    still = PairConfig(
        size=32, feature_grid=4, color=ColorPerturbation(gain=0, offset=0), warp=TPSParams(displacement=0)
    )
    item = PairDataset(ProceduralShapes(32, 1), still)[0]
    torch.testing.assert_close(item["reference"], item["ground_truth"], atol=1e-5, rtol=0)
    assert item["pos"].tolist() == list(range(16))
    torch.testing.assert_close(item["ground_truth"], image * 2 - 1)


def test_the_ground_truth_is_the_recoloured_image_and_the_sketch_is_of_the_original():
    image = ProceduralShapes(32, 1)[0]
    unwarped = PairConfig(size=32, feature_grid=4, warp=TPSParams(displacement=0), sketch_sigma_range=(0.4, 0.4))
    item = PairDataset(ProceduralShapes(32, 1), unwarped)[0]
    assert (item["ground_truth"] - (image * 2 - 1)).abs().max() > 0.05  # recoloured...
    torch.testing.assert_close(item["reference"], item["ground_truth"], atol=1e-5, rtol=0)  # ...and shown
    torch.testing.assert_close(item["sketch"], xdog(image, XDoGParams(sigma=0.4)) * 2 - 1)


# --- preview ----------------------------------------------------------------------------------


def test_preview_writes_a_grid_for_procedural_and_folder_data(tmp_path, capsys):
    out = tmp_path / "preview.png"
    preview.main(["--out", str(out), "--size", "64", "--feature-grid", "8", "--count", "2"])
    sheet = Image.open(out)
    assert sheet.size == (64 * len(preview.COLUMNS), 18 + 2 * 64)
    # The correspondence panels carry coloured markers, the sketch panel does not.
    pixels = np.asarray(sheet.convert("HSV"))[18:, :, 1]
    assert pixels[:, : 64].max() < 10 and (pixels[:, 3 * 64 : 4 * 64] > 200).any()
    square_image(80).save(tmp_path / "one.png")
    preview.main(["--out", str(out), "--data", str(tmp_path), "--size", "64", "--feature-grid", "8", "--count", "3"])
    assert Image.open(out).size == (64 * len(preview.COLUMNS), 18 + 3 * 64)


def test_the_match_sheet_puts_the_models_dots_on_its_best_cells():
    item = make_dataset(None, 64, 8, seed=3, length=1)[0]
    pos = item["pos"]
    right = {**item, "output": item["ground_truth"], "best": pos.clamp_min(0)}
    # Every cell's best one cell to the right of the true one (or left, on the last column).
    moved = torch.where(pos % 8 < 7, pos + 1, pos - 1).clamp_min(0)
    wrong = {**right, "best": moved}
    panels = []
    for row in (right, wrong):
        sheet = np.asarray(preview.render_matches([row], 8))
        side = 192  # 64-pixel images enlarged 3x
        assert sheet.shape == (18 + side, side * len(preview.MATCH_COLUMNS), 3)
        panels.append([sheet[18:, column * side : (column + 1) * side] for column in range(len(preview.MATCH_COLUMNS))])
    (_, true_cells, best_right, output, truth), (_, _, best_wrong, _, _) = panels
    # Right: the best cells' panel is the true cells' panel; wrong: the dots moved.
    assert np.array_equal(best_right, true_cells) and not np.array_equal(best_wrong, true_cells)
    assert np.array_equal(output, truth)


def test_preview_reports_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        preview.main(["--out", str(tmp_path / "p.png"), "--size", "64", "--feature-grid", "7"])
    assert "feature_grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        preview.main(["--out", str(tmp_path / "p.png"), "--data", str(tmp_path / "none")])
    assert "not a directory" in capsys.readouterr().err
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "broken.png").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UnreadableImageWarning):
        preview.main(["--out", str(tmp_path / "p.png"), "--data", str(unreadable), "--size", "32", "--feature-grid", "4"])
    assert exit_info.value.code == 2
    assert f"error: the data folder '{unreadable}': none of its 1 image files could be read" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("missing/p.png", "the folder '{tmp}/missing' does not exist"),
        (".", "is a folder"),
        ("preview", "must end in an image suffix Pillow writes"),
    ],
)
def test_preview_checks_out_before_drawing_samples(tmp_path, capsys, monkeypatch, out, message):
    def no_dataset(*args, **kwargs):
        raise AssertionError("the samples were drawn before --out was checked")

    monkeypatch.setattr(preview, "make_dataset", no_dataset)
    with pytest.raises(SystemExit) as exit_info:
        preview.main(["--out", str(tmp_path / out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --out " in err and message.format(tmp=tmp_path) in err
