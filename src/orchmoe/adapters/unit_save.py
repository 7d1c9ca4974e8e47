"""``PeftModel.save_pretrained`` over an existing orchmoe adapter, written as one unit.

PEFT writes ``adapter_model.safetensors``, then its model card, then ``adapter_config.json`` into the folder
itself: a kill between the two files leaves new weights beside the old config, whose checksum then refuses
them, and the adapter that was there is gone. orchmoe's PeftModels (`orchmoe.get_model`, `orchmoe.load_adapter`,
``PeftModel.from_pretrained``) get a ``save_pretrained`` that writes such a save into a hidden sibling and swaps
it in (`orchmoe.utils.fileio.atomic_folder`): a kill leaves the old adapter or the new one (`adopt_saves`).
"""

from __future__ import annotations

import functools
import os
import shutil
import types
from pathlib import Path
from typing import Any

from torch import nn

from orchmoe.adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from orchmoe.utils.fileio import atomic_folder, check_replaceable, path_kind

__all__ = ["adopt_saves", "save_pretrained_as_unit"]


def save_pretrained_as_unit(peft_save: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """PEFT's ``save_pretrained`` over an existing adapter, as one unit (installed on orchmoe's PeftModels by
    `adopt_saves`): written into a hidden sibling, then swapped in (`orchmoe.utils.fileio.atomic_folder`), so a kill
    leaves the old adapter or the new one, never new weights beside the old config's checksum. The folder's other
    files (a tokenizer saved beside, a user's notes) are carried over by hard link. A new folder, or one without
    an adapter (a Trainer's checkpoint being written), is PEFT's as usual.

    Args:
        peft_save: PEFT's own ``save_pretrained`` of the model.
        save_directory, args, kwargs: its arguments.
    """
    path = Path(save_directory)
    if not kwargs.get("is_main_process", True) or path_kind(path / ADAPTER_CONFIG) is None:
        return peft_save(save_directory, *args, **kwargs)
    check_replaceable(path, "folder")
    with atomic_folder(path) as stage:
        for child in path.iterdir():
            if child.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin"):
                _carry(child, stage / child.name)
        return peft_save(str(stage), *args, **kwargs)


def _carry(src: Path, dst: Path) -> None:
    """Put a file of the old folder into the new one: a hard link (a copy where PEFT rewrites it, README.md)."""
    kind = path_kind(src)
    if kind == "symbolic link":
        os.symlink(os.readlink(src), dst)
    elif kind == "folder":
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    elif kind == "regular file":
        (shutil.copy2 if src.name == "README.md" else _link_or_copy)(src, dst)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def adopt_saves(peft_model: Any) -> Any:
    """Make ``peft_model.save_pretrained`` write over an existing adapter as one unit (`save_pretrained_as_unit`);
    idempotent. Returns the model."""
    if isinstance(peft_model, nn.Module) and "save_pretrained" not in peft_model.__dict__:
        peft_model.__dict__["save_pretrained"] = functools.partial(
            save_pretrained_as_unit, types.MethodType(type(peft_model).save_pretrained, peft_model)
        )
    return peft_model
