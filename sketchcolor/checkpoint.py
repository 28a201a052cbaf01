"""Checkpoint files: every tensor in one safetensors file, all other state as JSON in its metadata.

Reading one never runs code from it (safetensors holds raw tensors, the JSON plain data), and
writing is atomic (a temporary file in the same folder, then ``os.replace``), so a crash or
Ctrl-C during a save leaves the previous checkpoint intact, and durable (the file and then its
folder are flushed to disk), so a power loss right after a save does not take it back.

The state is a tree of dicts, lists, tuples, numbers, strings, None and tensors. Tensors are
named by their path in the tree ("generator/scft.query.weight"); the JSON keeps the tree with
each tensor replaced by its name.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "sketchcolor-checkpoint-1"
_TENSOR, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"


def _pack(tree, path: str, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(tree, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in tree):
            return {key: _pack(value, f"{path}/{key}" if path else key, tensors) for key, value in tree.items()}
        # Keys that JSON objects cannot hold as they are (optimizer state is keyed by int).
        return {_ITEMS: [[key, _pack(value, f"{path}/{key}", tensors)] for key, value in tree.items()]}
    if isinstance(tree, tuple):
        return {_TUPLE: [_pack(value, f"{path}/{index}", tensors) for index, value in enumerate(tree)]}
    if isinstance(tree, list):
        return [_pack(value, f"{path}/{index}", tensors) for index, value in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"checkpoint state at {path!r} has unsupported type {type(tree).__name__}")


def _unpack(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return tensors[tree[_TENSOR]]
        if _TUPLE in tree:
            return tuple(_unpack(value, tensors) for value in tree[_TUPLE])
        if _ITEMS in tree:
            return {key: _unpack(value, tensors) for key, value in tree[_ITEMS]}
        return {key: _unpack(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_unpack(value, tensors) for value in tree]
    return tree


@contextlib.contextmanager
def atomic_replacement(path: Path):
    """A temporary path beside ``path`` for the block to write: when the block ends without an
    error, the file is flushed to disk and replaces ``path`` in one step; otherwise, or after a
    crash, ``path`` is as it was. The temporary name is hidden (a leading dot), so globs of the
    real files do not see it."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield temporary
        # The permissions of any new file (safetensors writes its files owner-only, which on a
        # shared file system hides checkpoints from the rest of the team).
        os.chmod(temporary, _new_file_mode())
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        sync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask (read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def sync_folder(folder: Path) -> None:
    """Flush ``folder``'s list of entries to disk. A rename or a new name is a change to the
    folder, not to the file: until the folder is flushed, a power loss can undo it, leaving the
    old file (or none) under the name. Only POSIX systems let a folder be opened for this; on
    Windows, NTFS journals renames itself."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each new entry flushed to disk like a rename
    (``sync_folder``): a checkpoint is only as durable as the entries of the folders above it."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        sync_folder(new.parent)


def write_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (a dict tree holding tensors) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, "", tensors)
    with atomic_replacement(Path(path)) as temporary:
        save_file(tensors, str(temporary), metadata={"format": FORMAT, "state": json.dumps(skeleton)})


def read_checkpoint(path: str | Path, sections: tuple[str, ...] | None = None) -> dict:
    """The state written by ``write_checkpoint``; with ``sections``, only those top-level entries
    (and only their tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a file")
    damaged = f"checkpoint {str(path)!r} is damaged"
    try:
        with safe_open(str(path), framework="pt") as opened:
            metadata = opened.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"checkpoint {str(path)!r} is not a sketchcolor checkpoint (format {metadata.get('format')!r})")
            if "state" not in metadata:
                raise ValueError(f"{damaged}: its metadata has no 'state'")
            try:
                skeleton = json.loads(metadata["state"])
            except json.JSONDecodeError as error:
                raise ValueError(f"{damaged}: its state is not JSON ({error})") from error
            if not isinstance(skeleton, dict):
                raise ValueError(f"{damaged}: its state is a JSON {type(skeleton).__name__}, not an object")
            if sections is not None:
                missing = [name for name in sections if name not in skeleton]
                if missing:
                    raise ValueError(f"checkpoint {str(path)!r} has no {', '.join(missing)}")
                skeleton = {name: skeleton[name] for name in sections}
                wanted = tuple(f"{name}/" for name in sections)
                names = [name for name in opened.keys() if name.startswith(wanted)]
            else:
                names = list(opened.keys())
            tensors = {name: opened.get_tensor(name) for name in names}
    except (OSError, SafetensorError) as error:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {error}") from error
    # Training saves only finite states (a non-finite loss or gradient stops it before the
    # optimizer step), so a NaN or infinity here is damage, which would otherwise color every
    # image black or resume into NaN losses.
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ValueError(f"{damaged}: its tensor {name!r} holds NaN or infinite values")
    try:
        return _unpack(skeleton, tensors)
    except KeyError as error:
        raise ValueError(f"{damaged}: its state names the tensor {error}, which the file does not hold") from error
    except (TypeError, ValueError) as error:
        raise ValueError(f"{damaged}: its state is not a checkpoint's tree ({error})") from error
