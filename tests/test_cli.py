"""The ``sketchcolor`` command line: help of every subcommand, and each one run on a tiny model."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sketchcolor.cli import SUBCOMMANDS, build_parser, main

SUBCOMMAND_NAMES = ("train", "colorize", "sketch", "demo", "eval", "verify", "bench")
TINY_TRAIN_OPTIONS = [
    "--size", "32", "--dataset-length", "4", "--batch-size", "2", "--workers", "0", "--device", "cpu",
    "--attn", "reference", "--width", "2", "--scft-stride", "8", "--residual-blocks", "1",
    "--disc-width", "8", "--disc-layers", "2", "--sample-every", "1", "--log-every", "1",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder trained for 2 steps through ``sketchcolor train``."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY_TRAIN_OPTIONS, "--steps", "2", "--out", str(out)]) == 0
    return out


def _write_image(path, size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)
    return path


def test_every_subcommand_is_registered():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert len(choices) == len(SUBCOMMANDS)
    assert set(SUBCOMMAND_NAMES) <= set(choices)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("train", ["--data", "--size", "--attn", "--resume", "--width", "--scft-stride", "--l1-weight", "--vgg-weights", "--amp"]),
        ("colorize", ["--sketch", "--color-image", "--reference", "--checkpoint", "--out"]),
        ("sketch", ["--out", "--sigma"]),
        ("demo", ["--out", "--steps"]),
        ("eval", ["--checkpoint", "--data", "--count"]),
    ],
)
def test_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in expected:
        assert option in text, f"{command} --help does not mention {option}"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "sketchcolor", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for name in SUBCOMMAND_NAMES:
        assert name in result.stdout


def test_train_writes_a_run(tiny_run):
    assert sorted(path.name for path in (tiny_run / "checkpoints").iterdir()) == ["checkpoint-00000002.safetensors"]
    assert len((tiny_run / "metrics.jsonl").read_text().splitlines()) == 2
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["width"] == 2 and config["size"] == 32


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--size", "40", "must be a multiple of 16 (the encoders downsample 16x), got 40"),
        ("--lr-g", "nan", "must be a finite positive number, got nan"),
        ("--residual-blocks", "0", "must be a positive int, got 0"),
        ("--l1-weight", "-1", "must be a finite non-negative number, got -1.0"),
        ("--num-negatives", "0", "must be a positive int, got 0"),
    ],
)
def test_bad_config_values_name_the_flag(tmp_path, capsys, option, value, problem):
    # One of each config's fields: training, model, loss.
    assert main(["train", *TINY_TRAIN_OPTIONS, option, value, "--out", str(tmp_path)]) == 2
    assert f"sketchcolor train: error: argument {option}: {problem}\n" == capsys.readouterr().err


def test_bad_option_values_name_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--scft-stride", "2"])
    assert "--scft-stride" in capsys.readouterr().err


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("not a run")
    assert main(["train", *TINY_TRAIN_OPTIONS, "--steps", "1", "--out", str(taken)]) == 2
    assert f"out {str(taken)!r} is a file; expected a folder" in capsys.readouterr().err
    assert taken.read_text() == "not a run"


def test_train_refuses_to_start_afresh_in_a_run_folder(tiny_run, capsys):
    checkpoints = sorted((tiny_run / "checkpoints").iterdir())
    assert main(["train", *TINY_TRAIN_OPTIONS, "--steps", "4", "--out", str(tiny_run)]) == 2
    assert f"already holds the checkpoints of a run (the latest: {checkpoints[-1]}); pass --resume auto" in capsys.readouterr().err
    assert sorted((tiny_run / "checkpoints").iterdir()) == checkpoints


def test_colorize_any_size(tiny_run, tmp_path):
    sketch = _write_image(tmp_path / "sketch.png", (50, 37), 0, mode="L")
    reference = _write_image(tmp_path / "reference.png", (23, 61), 1)
    out = tmp_path / "out" / "colored.png"
    assert main(["colorize", "--sketch", str(sketch), "--reference", str(reference), "--checkpoint", str(tiny_run), "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == (50, 37)
        assert np.asarray(image).std() > 0


def test_colorize_from_a_color_image(tiny_run, tmp_path):
    photo = _write_image(tmp_path / "photo.png", (40, 40), 2)
    checkpoint = sorted((tiny_run / "checkpoints").iterdir())[-1]
    out = tmp_path / "colored.png"
    assert main(["colorize", "--color-image", str(photo), "--reference", str(photo), "--checkpoint", str(checkpoint), "-o", str(out), "--size", "64"]) == 0
    with Image.open(out) as image:
        assert image.size == (40, 40)


def test_colorize_a_folder(tiny_run, tmp_path, capsys):
    sources = tmp_path / "pages"
    sources.mkdir()
    _write_image(sources / "a.png", (50, 37), 0, mode="L")
    _write_image(sources / "b.jpg", (32, 32), 1, mode="L")
    (sources / "broken.webp").write_bytes(b"garbage")
    (sources / "notes.txt").write_text("not an image")
    (sources / "sub").mkdir()
    _write_image(sources / "sub" / "c.png", (32, 32), 2, mode="L")  # subfolders are not searched
    reference = _write_image(tmp_path / "reference.png", (23, 61), 3)
    out = tmp_path / "colored"
    common = ["--reference", str(reference), "--checkpoint", str(tiny_run)]
    # A source that cannot be read is skipped and named, and the exit status says so.
    assert main(["colorize", "--sketch", str(sources), *common, "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"wrote 2 images to {out}" in captured.out
    assert "could not read 1 of the sources, skipped: broken.webp" in captured.err
    assert sorted(path.name for path in out.iterdir()) == ["a.png", "b.png"]
    with Image.open(out / "a.png") as image:
        assert image.size == (50, 37)
        from_folder = np.asarray(image)
    # Each image as the single-file command colors it.
    assert main(["colorize", "--sketch", str(sources / "a.png"), *common, "-o", str(tmp_path / "single.png")]) == 0
    with Image.open(tmp_path / "single.png") as image:
        assert np.array_equal(np.asarray(image), from_folder)


@pytest.mark.parametrize(
    ("option", "files", "out", "message"),
    [
        ("--sketch", ["a.png"], "pages", "out '{out}' is the sketch folder itself; its images would be replaced"),
        ("--sketch", ["a.jpg", "a.png"], "colored", "a.jpg and a.png in '{pages}' would both be written to a.png"),
        ("--color-image", ["notes.txt"], "colored", "color_image folder '{pages}' contains no .png, .jpg, .jpeg, .webp files"),
        ("--sketch", ["a.png", "file"], "pages/file", "out '{out}' is a file; expected a folder"),
    ],
)
def test_colorize_a_folder_checks_everything_before_the_first_image(tiny_run, tmp_path, capsys, monkeypatch, option, files, out, message):
    import sketchcolor.colorize as colorize_module

    monkeypatch.setattr(colorize_module, "load_generator", lambda *args, **kwargs: pytest.fail("loaded the model before the checks"))
    pages = tmp_path / "pages"
    pages.mkdir()
    for name in files:
        _write_image(pages / name, (32, 32), 0) if name.endswith((".png", ".jpg")) else (pages / name).write_text("x")
    out = tmp_path / out
    assert main(["colorize", option, str(pages), "--reference", str(pages / files[0]), "--checkpoint", str(tiny_run), "-o", str(out)]) == 2
    assert message.format(out=out, pages=pages) in capsys.readouterr().err
    assert sorted(path.name for path in pages.iterdir()) == sorted(files)


def test_colorize_reports_a_missing_checkpoint(tmp_path, capsys):
    image = _write_image(tmp_path / "image.png", (32, 32), 3)
    code = main(["colorize", "--sketch", str(image), "--reference", str(image), "--checkpoint", str(tmp_path / "nope"), "-o", str(tmp_path / "o.png")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--size", "0"], "size must be an int >= 16, got 0"),
        (["--attn", "cuda", "--device", "cpu"], "attn='cuda': impl='cuda' runs on CUDA tensors, got tensors on cpu"),
    ],
)
def test_colorize_rejects_options_it_cannot_run_with(tiny_run, tmp_path, capsys, options, message):
    image = _write_image(tmp_path / "image.png", (32, 32), 4)
    out = tmp_path / "o.png"
    assert main(["colorize", "--sketch", str(image), "--reference", str(image), "--checkpoint", str(tiny_run), "-o", str(out), *options]) == 2
    assert f"sketchcolor colorize: error: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("colored", "out '{out}' must end in an image suffix Pillow writes, such as .png or .jpg; got none"),
        ("colored.xyz", "out '{out}' must end in an image suffix Pillow writes, such as .png or .jpg; got .xyz"),
        ("colored.xbm", "out '{out}': Pillow cannot write RGB images as XBM (cannot write mode RGB as XBM); use .png"),
        ("folder.png", "out '{out}' is a folder; expected the path of an image file to write"),
        ("image.png/colored.png", "out '{out}': its folder cannot be created, '{tmp}/image.png' is a file"),
    ],
)
def test_colorize_and_sketch_check_the_output_first(tiny_run, tmp_path, capsys, monkeypatch, name, message):
    import sketchcolor.colorize as colorize_module

    image = _write_image(tmp_path / "image.png", (32, 32), 4)
    (tmp_path / "folder.png").mkdir()
    out = tmp_path / name
    monkeypatch.setattr(colorize_module, "load_generator", lambda *args, **kwargs: pytest.fail("loaded the model before the checks"))
    assert main(["colorize", "--sketch", str(image), "--reference", str(image), "--checkpoint", str(tiny_run), "-o", str(out)]) == 2
    assert f"sketchcolor colorize: error: {message.format(out=out, tmp=tmp_path)}" in capsys.readouterr().err
    assert main(["sketch", str(image), "-o", str(out)]) == 2
    assert f"sketchcolor sketch: error: out '{out}'" in capsys.readouterr().err
    assert not out.is_file()


@pytest.mark.parametrize("replaced", ["sketch", "reference"])
def test_colorize_and_sketch_refuse_to_write_over_their_inputs(tiny_run, tmp_path, capsys, monkeypatch, replaced):
    import sketchcolor.colorize as colorize_module

    sketch = _write_image(tmp_path / "sketch.png", (32, 32), 4)
    reference = _write_image(tmp_path / "reference.png", (32, 32), 5)
    before = {path: path.read_bytes() for path in (sketch, reference)}
    out = tmp_path / f"{replaced}.png"
    monkeypatch.setattr(colorize_module, "load_generator", lambda *args, **kwargs: pytest.fail("loaded the model before the checks"))
    assert main(["colorize", "--sketch", str(sketch), "--reference", str(reference), "--checkpoint", str(tiny_run), "-o", str(out)]) == 2
    assert f"sketchcolor colorize: error: out '{out}' is the {replaced} file itself, which it would replace" in capsys.readouterr().err
    # A folder whose sketch has the reference's name would write over the reference.
    pages = tmp_path / "pages"
    pages.mkdir()
    _write_image(pages / "reference.jpg", (32, 32), 6)
    assert main(["colorize", "--sketch", str(pages), "--reference", str(reference), "--checkpoint", str(tiny_run), "-o", str(tmp_path)]) == 2
    assert f"sketchcolor colorize: error: out '{reference}' is the reference file itself" in capsys.readouterr().err
    assert main(["sketch", str(sketch), "-o", str(sketch)]) == 2
    assert f"sketchcolor sketch: error: out '{sketch}' is the image file itself" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in (sketch, reference)} == before


def test_colorize_checks_size_before_loading_the_model(tiny_run, tmp_path, capsys, monkeypatch):
    import sketchcolor.colorize as colorize_module

    image = _write_image(tmp_path / "image.png", (32, 32), 4)
    monkeypatch.setattr(colorize_module, "load_generator", lambda *args, **kwargs: pytest.fail("loaded the model before the checks"))
    assert main(["colorize", "--sketch", str(image), "--reference", str(image), "--checkpoint", str(tiny_run), "-o", str(tmp_path / "o.png"), "--size", "8"]) == 2
    assert "sketchcolor colorize: error: size must be an int >= 16, got 8" in capsys.readouterr().err


def test_sketch_checks_its_output_folder_first(tmp_path, capsys, monkeypatch):
    # The module, not the function that sketchcolor.data exports under its name.
    xdog_module = importlib.import_module("sketchcolor.data.xdog")
    image = _write_image(tmp_path / "image.png", (32, 32), 4)
    out = tmp_path / "missing" / "lines.png"
    monkeypatch.setattr(xdog_module, "load_rgb_image", lambda *args: pytest.fail("read the image before the checks"))
    assert main(["sketch", str(image), "-o", str(out)]) == 2
    assert f"sketchcolor sketch: error: out '{out}': the folder '{out.parent}' does not exist" in capsys.readouterr().err


def test_an_image_too_large_to_decode_safely_is_an_error_not_a_crash(tiny_run, tmp_path, capsys, monkeypatch):
    # Pillow's DecompressionBombError is neither a ValueError nor an OSError: it escaped the
    # command line's error handling as a traceback. 32 x 32 is over twice this limit, as a
    # 20000 x 20000 header is over twice the default one.
    image = _write_image(tmp_path / "image.png", (32, 32), 4)
    small = _write_image(tmp_path / "small.png", (8, 8), 5)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    expected = f"cannot read the image '{image}': Image size (1024 pixels) exceeds limit of 800 pixels"
    assert main(["sketch", str(image), "-o", str(tmp_path / "lines.png")]) == 2
    assert f"sketchcolor sketch: error: {expected}" in capsys.readouterr().err
    assert main(["colorize", "--sketch", str(small), "--reference", str(image), "--checkpoint", str(tiny_run), "-o", str(tmp_path / "o.png")]) == 2
    assert f"sketchcolor colorize: error: {expected}" in capsys.readouterr().err


def test_sketch_extracts_outlines(tmp_path):
    source = Image.new("RGB", (48, 40), (230, 200, 40))
    source.paste((20, 40, 200), (10, 10, 30, 30))
    source.save(tmp_path / "in.png")
    assert main(["sketch", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png")]) == 0
    with Image.open(tmp_path / "out.png") as sketch:
        array = np.asarray(sketch)
    assert sketch.mode == "L" and array.shape == (40, 48)
    assert array[20, 20] == 255 and array[2, 2] == 255  # flat areas stay white
    assert array[20, 8:12].min() < 128  # the square's left edge is drawn


def test_eval_reports_model_and_baselines(tiny_run, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tiny_run), "--count", "4", "--batch-size", "2", "--json", str(tmp_path / "scores.json")]) == 0
    text = capsys.readouterr().out
    for method in ("model", "blank_reference", "mean_color"):
        assert method in text
    assert "SCFT correspondence over" in text and "within one cell" in text
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report.keys() == {"scores", "correspondence"}
    scores = report["scores"]
    assert scores.keys() == {"model", "blank_reference", "mean_color"}
    for score in scores.values():
        assert 0 < score["l1"] < 1 and score["psnr"] > 0 and -1 <= score["ssim"] <= 1
    assert scores["model"] != scores["blank_reference"]
    match = report["correspondence"]
    # 4 pairs of the tiny run's 4x4 grid: most cells keep their content in the reference.
    assert 0 < match["cells"] <= 4 * 16 and match["chance_exact"] == 1 / 16
    assert 0 <= match["exact"] <= match["within_one"] <= 1 and match["chance_exact"] < match["chance_within_one"] <= 9 / 16


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch-size", "0"], "batch_size must be a positive int, got 0"),
        (["--batch-size", "-1"], "batch_size must be a positive int, got -1"),
        (["--attn", "cuda", "--device", "cpu"], "attn='cuda': impl='cuda' runs on CUDA tensors, got tensors on cpu"),
    ],
)
def test_eval_rejects_options_it_cannot_run_with(tiny_run, capsys, options, message):
    assert main(["eval", "--checkpoint", str(tiny_run), "--count", "4", *options]) == 2
    assert f"sketchcolor eval: error: {message}" in capsys.readouterr().err


@pytest.fixture
def tiny_demo(monkeypatch):
    """The demo preset, shrunk to a tiny model on 32x32 images."""
    import sketchcolor.train as train_module
    from sketchcolor.models import ModelConfig

    preset = train_module.demo_config

    def tiny_demo_config(out):
        return train_module.replace_config(
            preset(out), size=32, dataset_length=4, batch_size=2, workers=0, model=ModelConfig(width=2, scft_stride=8, residual_blocks=1, disc_width=8, disc_layers=2)
        )

    monkeypatch.setattr(train_module, "demo_config", tiny_demo_config)


def test_demo_runs_end_to_end(tmp_path, capsys, tiny_demo):
    # A few steps of a tiny model: the command's own wiring (train, evaluate, eval.json, the
    # closing summary) is what is tested here.
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--eval-count", "2", "--attn", "reference"]) == 0
    report = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert report["steps"] == 2 and report["stopped_early"] is None and report["scores"]["model"]["l1"] > 0
    assert report["correspondence"]["cells"] > 0
    assert (tmp_path / "demo" / "matches.png").is_file()
    assert f"outputs in {(tmp_path / 'demo').resolve()}" in capsys.readouterr().out


def test_demo_continues_the_run_in_its_folder(tmp_path, capsys, tiny_demo):
    out = tmp_path / "demo"
    demo = ["demo", "--out", str(out), "--eval-count", "2", "--attn", "reference"]
    assert main([*demo, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*demo, "--steps", "3"]) == 0
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-00000002.safetensors'} at step 2" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["steps"] == 3
    # Finished: evaluated again, the checkpoint left as it was.
    checkpoint = out / "checkpoints" / "checkpoint-00000003.safetensors"
    written = checkpoint.stat().st_mtime_ns
    (out / "eval.json").unlink()
    assert main([*demo, "--steps", "3"]) == 0
    assert f"checkpoint:  {checkpoint}" in capsys.readouterr().out
    assert checkpoint.stat().st_mtime_ns == written and json.loads((out / "eval.json").read_text())["steps"] == 3
    # Each run logs its last step (the preset logs every 10 otherwise).
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--eval-count", "0"], "--eval-count must be at least 1, got 0"),
        (["--steps", "0"], "argument --steps: must be a positive int, got 0"),
        (["--max-minutes", "-1"], "argument --max-minutes: must be positive, got -1.0"),
    ],
)
def test_demo_checks_its_options_before_training(tmp_path, capsys, options, message):
    assert main(["demo", "--out", str(tmp_path / "demo"), *options]) == 2
    assert f"sketchcolor demo: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_an_interrupted_train_exits_with_status_130(tmp_path, capsys, ctrl_c_at_step_2):
    # A job script must be able to tell a run stopped by Ctrl-C (saved, to be resumed) from a finished one.
    assert main(["train", *TINY_TRAIN_OPTIONS, "--steps", "4", "--out", str(tmp_path)]) == 130
    assert f"step 2; checkpoint: {tmp_path / 'checkpoints' / 'checkpoint-00000002.safetensors'}" in capsys.readouterr().out


def test_an_interrupted_demo_skips_the_evaluation(tmp_path, capsys, tiny_demo, ctrl_c_at_step_2):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--eval-count", "2", "--attn", "reference"]) == 130
    assert "stopped at step 2 before the evaluation; run the same command again to continue" in capsys.readouterr().out
    assert not (out / "eval.json").exists() and (out / "checkpoints" / "checkpoint-00000002.safetensors").is_file()


def test_a_demo_stopped_by_its_time_limit_says_so(tmp_path, capsys, tiny_demo, monkeypatch):
    import types

    import sketchcolor.train as train_module

    clock = iter(range(0, 10**6, 60))  # each of the training loop's readings a minute after the last
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "50", "--max-minutes", "2", "--eval-count", "2", "--attn", "reference"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["stopped_early"] == "time limit" and 0 < report["steps"] < 50
    assert "training stopped at the time limit before step 50; run the same command again to continue" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("--json", "missing/scores.json", "--json '{path}': the folder '{folder}' does not exist"),
        ("--matches", "missing/matches.png", "--matches '{path}': the folder '{folder}' does not exist"),
        ("--matches", "matches.json", "--matches '{path}' must end in an image suffix Pillow writes"),
        ("--matches", "matches.xbm", "--matches '{path}': Pillow cannot write RGB images as XBM"),
    ],
)
def test_eval_checks_its_outputs_before_evaluating(tiny_run, tmp_path, capsys, monkeypatch, option, name, message):
    import sketchcolor.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated before the check"))
    target = tmp_path / name
    assert main(["eval", "--checkpoint", str(tiny_run), option, str(target)]) == 2
    assert message.format(path=target, folder=target.parent) in capsys.readouterr().err


def test_eval_draws_scfts_matches(tiny_run, tmp_path, capsys):
    from sketchcolor.data.preview import MATCH_COLUMNS

    out = tmp_path / "matches.png"
    assert main(["eval", "--checkpoint", str(tiny_run), "--count", "3", "--batch-size", "2", "--matches", str(out)]) == 0
    assert f"wrote {out}: SCFT's matches on 3 pairs" in capsys.readouterr().out
    # The tiny run's 32-pixel pairs, enlarged 6x: one row per pair (fewer than 4 were scored).
    with Image.open(out) as sheet:
        assert sheet.size == (192 * len(MATCH_COLUMNS), 18 + 3 * 192)
