"""Checks that a command's outputs can be written, run before its work.

A training run, a benchmark or a colorized folder should not fail at its end because its output
path names a folder, lies in a missing folder or cannot be written. Each check raises ValueError
naming the option (``--json``, ``out``), which the command line reports with exit status 2.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image


def check_output_file(option: str, path: str | Path) -> None:
    """Raise ValueError naming ``option`` unless the file ``path`` can be written (created or
    replaced): it is not a folder, and its folder exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; expected the path of a file to write")
    if not path.parent.is_dir():
        problem = "is not a folder" if path.parent.exists() else "does not exist"
        raise ValueError(f"{option} {str(path)!r}: the folder {str(path.parent)!r} {problem}")
    _check_writable(option, path if path.exists() else path.parent)


def check_output_folder(option: str, path: str | Path, file_names: tuple[str, ...]) -> None:
    """Raise ValueError naming ``option`` unless ``path`` is a folder in which the files
    ``file_names`` can be written, or can be created as one (with its missing parents)."""
    path = Path(path)
    if path.is_dir():
        for name in file_names:
            check_output_file(option, path / name)
        return
    if path.exists():
        raise ValueError(f"{option} {str(path)!r} is a file; expected a folder (created if missing)")
    nearest = _nearest_existing(path.parent)
    if not nearest.is_dir():
        raise ValueError(f"{option} {str(path)!r} cannot be created: {str(nearest)!r} is a file")
    _check_writable(option, nearest)


def check_output_image(option: str, path: str | Path, *, mode: str = "RGB", create_folder: bool = False) -> None:
    """``check_output_file`` for an image of Pillow mode ``mode`` ("RGB", "L") that Pillow writes
    in the format of ``path``'s suffix, which must be one it can write that mode in (a 1 x 1
    image is written to memory to find out: XBM, MSP and Palm take only 1-bit images, and HDF5
    has no writer). With ``create_folder`` the image's folder may be missing (the writer creates
    it) where it can be created."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; expected the path of an image file to write")
    suffix = path.suffix.lower()
    image_format = Image.registered_extensions().get(suffix)
    if image_format not in Image.SAVE:
        raise ValueError(f"{option} {str(path)!r} must end in an image suffix Pillow writes, such as .png or .jpg; got {suffix or 'none'}")
    try:
        Image.new(mode, (1, 1)).save(io.BytesIO(), format=image_format)
    except (OSError, ValueError) as error:
        raise ValueError(f"{option} {str(path)!r}: Pillow cannot write {mode} images as {image_format} ({error}); use .png") from None
    if not create_folder or path.parent.is_dir():
        check_output_file(option, path)
        return
    nearest = _nearest_existing(path.parent)
    if not nearest.is_dir():
        raise ValueError(f"{option} {str(path)!r}: its folder cannot be created, {str(nearest)!r} is a file")
    _check_writable(option, nearest)


def check_not_an_input(option: str, path: str | Path, inputs: dict[str, str | Path]) -> None:
    """Raise ValueError naming ``option`` if writing ``path`` would replace one of the command's
    ``inputs`` (argument name -> file)."""
    for name, input_path in inputs.items():
        if Path(path).resolve() == Path(input_path).resolve():
            raise ValueError(f"{option} {str(path)!r} is the {name} file itself, which it would replace: choose another path")


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _check_writable(option: str, path: Path) -> None:
    kind = "folder" if path.is_dir() else "file"
    # Creating a file in a folder needs write and search permission on the folder.
    if not os.access(path, os.W_OK | os.X_OK if kind == "folder" else os.W_OK):
        raise ValueError(f"{option}: the {kind} {str(path)!r} is not writable")
