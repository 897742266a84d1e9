"""Checkpoints: {arch, num_classes, model_kwargs, state_dict, ...}, rebuilt by ``load_model``.

The arch string is what ``build_model`` was given (``wrn40_4``, ``timm:resnet18``, ...), so a
checkpoint of any model the trainer builds is one the cache builder and ``backmix eval`` can read.

Loading a checkpoint never runs code: checkpoints are shared and downloaded, and a pickle can
carry any call. ``torch.load`` is always given ``weights_only=True`` (tensors, dicts, lists,
strings, numbers only), so whatever a checkpoint carries besides weights (config, loader
position, RNG state, optimiser) is stored as such plain values; a file that needs anything else
is refused with one line naming the file and the first foreign object. A ``.safetensors`` file
(no pickle at all; see ``save_safetensors``) is accepted wherever a checkpoint is.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.limits import check_regular_file, quoted
from backmix._fs import atomic_file

from .zoo import build_model, unwrap


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, arch: str, num_classes: int,
                    model_kwargs: dict | None = None, **extra) -> Path:
    """Atomically write {arch, num_classes, model_kwargs, state_dict, **extra}."""
    state = unwrap(model).state_dict()
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        # Through a Python file: torch's own writer reports a full disk as a RuntimeError ("unexpected
        # pos"), a Python file as the OSError (ENOSPC) that atomic_file turns into one line.
        torch.save({"arch": arch, "num_classes": num_classes, "model_kwargs": model_kwargs or {},
                    "state_dict": state, **extra}, f)
    return Path(path)


def save_safetensors(path: str | os.PathLike, model: nn.Module, *, arch: str, num_classes: int,
                     model_kwargs: dict | None = None, known_classes=()) -> Path:
    """Atomically write the weights as ``.safetensors``, arch and classes in its text metadata:
    a file to share that no reader ever unpickles."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    meta = {"arch": arch, "num_classes": str(num_classes), "model_kwargs": json.dumps(model_kwargs or {}),
            "known_classes": json.dumps(list(known_classes))}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dict, read without running any code (see the module's docstring)."""
    path = Path(path)
    if path.is_dir():
        raise BackMixError(f"checkpoint {path} is a folder; pass a checkpoint file in it, "
                           f"{path / 'best.pt'} or {path / 'last.pt'}")
    check_regular_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if not head.startswith((b"PK\x03\x04", b"\x80")):   # torch writes a zip archive, or (legacy) a pickle
        kind = "it is empty" if not head else "a text file?" if _is_text(head) else "neither a zip archive nor a pickle"
        raise BackMixError(f"checkpoint {path} is not a torch checkpoint ({kind})")
    try:
        with warnings.catch_warnings():   # torch's note on a plain pickle's protocol: the refusal says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):   # not a pickle of foreign objects: a damaged file
            raise BackMixError(f"checkpoint {path} is not a readable torch checkpoint (UnpicklingError)") from None
        raise BackMixError(f"checkpoint {path} needs {foreign_object(path)} to load, not only tensors and plain values; "
                           f"refused, because unpickling it could run code") from None
    except Exception as e:  # torch raises many types for a bad file
        raise BackMixError(f"checkpoint {path} is not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"arch", "num_classes", "state_dict"} <= set(ckpt):
        raise BackMixError(f"checkpoint {path} was not written by backmix (no arch/num_classes/state_dict)")
    return check_fields(ckpt, path)


def check_fields(ckpt: dict, path: Path) -> dict:
    """``ckpt`` when the fields its readers use have their kinds (a hand-made file may hold anything)."""
    if not isinstance(ckpt["arch"], str):
        raise BackMixError(f"checkpoint {path}: its arch is not a model name, got {quoted(ckpt['arch'])}")
    classes = ckpt["num_classes"]
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise BackMixError(f"checkpoint {path}: its num_classes is not a whole number >= 1, got {quoted(classes)}")
    if not isinstance(ckpt.get("config") or {}, dict):
        raise BackMixError(f"checkpoint {path}: its config is not a mapping")
    if not isinstance(ckpt.get("model_kwargs") or {}, dict):
        raise BackMixError(f"checkpoint {path}: its model_kwargs is not a mapping")
    known = ckpt.get("known_classes") or []
    if not isinstance(known, (list, tuple)) or not all(isinstance(c, str) for c in known):
        raise BackMixError(f"checkpoint {path}: its known_classes is not a list of class names")
    return ckpt


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and b"\0" not in head   # a character cut at the end is still text
    return b"\0" not in head


def foreign_object(path: Path) -> str:
    """The first global a pickle would import, found by reading its opcodes (nothing is run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive: a plain pickle's opcodes are read below
        names = []
    return names[0] if names else (_first_pickle_global(path) or "another kind of object")


def _first_pickle_global(path: Path):
    """The ``module.name`` of a plain pickle's first GLOBAL/STACK_GLOBAL opcode; None if it has none."""
    import pickletools
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    return arg.replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # the opcodes stop making sense: nothing more to name
        return None
    return None


def read_safetensors(path: Path) -> dict:
    """A ``.safetensors`` file as a checkpoint dict; its arch and class count come from its metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BackMixError(f"checkpoint {path} is not a readable safetensors file ({e})") from None
    try:
        ckpt = {"arch": meta["arch"], "num_classes": int(meta["num_classes"]), "state_dict": state,
                "model_kwargs": json.loads(meta.get("model_kwargs", "{}")),
                "known_classes": json.loads(meta.get("known_classes", "[]"))}
    except (KeyError, ValueError, RecursionError):
        raise BackMixError(f"checkpoint {path} has no backmix metadata (arch, num_classes); write it with "
                           f"backmix.models.save_safetensors") from None
    return check_fields(ckpt, path)


def load_model(path: str | os.PathLike, *, arch: str | None = None,
               num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint; ``arch``/``num_classes`` given are checked against it."""
    ckpt = read_checkpoint(path)
    if arch is not None and ckpt["arch"] != arch:
        raise BackMixError(f"checkpoint {path} holds a {ckpt['arch']} model, not {arch}")
    if num_classes is not None and ckpt["num_classes"] != num_classes:
        raise BackMixError(f"checkpoint {path} has {ckpt['num_classes']} classes, the data has {num_classes}")
    check_shapes(ckpt, path)
    try:
        model = build_model(ckpt["arch"], ckpt["num_classes"], **ckpt.get("model_kwargs", {}))
    except (TypeError, ValueError, OverflowError):   # options the model's constructor does not take
        raise BackMixError(f"checkpoint {path}: its model_kwargs {quoted(ckpt.get('model_kwargs'))} do not fit "
                           f"a {ckpt['arch']}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise BackMixError(f"checkpoint {path}: weights do not fit a {ckpt['arch']} "
                           f"with {ckpt['num_classes']} classes") from None
    return model, ckpt


def check_shapes(ckpt: dict, path) -> None:
    """Refuses a checkpoint whose metadata (arch, class count, model_kwargs) describes another model than
    its weights, before the model is built: the metadata is text anyone can edit, and ``width: 1e6``
    would allocate petabytes. The model is first built on the meta device (shapes, no memory)."""
    weights = ckpt["state_dict"]
    if not isinstance(weights, dict):
        return   # load_state_dict says what is wrong
    try:
        with torch.device("meta"):
            shell = build_model(ckpt["arch"], ckpt["num_classes"], **(ckpt.get("model_kwargs") or {}))
    except (TypeError, ValueError, OverflowError):
        raise BackMixError(f"checkpoint {path}: its model_kwargs {quoted(ckpt.get('model_kwargs'))} do not fit "
                           f"a {ckpt['arch']}") from None
    except BackMixError as e:
        raise BackMixError(f"checkpoint {path}: {e}") from None
    except (RuntimeError, NotImplementedError):   # a model whose constructor reads tensor values
        return
    own = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    wrong = sorted(k for k in own if given.get(k) != own[k])
    if wrong:
        shown = f"{wrong[0]} {given.get(wrong[0], 'missing')}, a {ckpt['arch']} of its metadata needs {own[wrong[0]]}"
        raise BackMixError(f"checkpoint {path}: its weights do not fit its arch, num_classes and model_kwargs "
                           f"({quoted(ckpt.get('model_kwargs') or {})}): {shown}")

