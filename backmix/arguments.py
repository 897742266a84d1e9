"""Checks of the library's arguments: a call of ``backmix.loader``/``evaluate``/``rebuild`` with the
wrong thing fails as the command line does, with a ``BackMixError`` (a wrong value) or a
``TypeError`` (a wrong kind of thing) naming the argument, before any work, never with a
traceback from deep inside or a silently wrong number."""
from __future__ import annotations

import os

import numpy as np
from torch import nn

from backmix.osr_data.errors import BackMixError


def check_split(split) -> str:
    if isinstance(split, bool) or not isinstance(split, (str, int)):
        raise TypeError(f"split must be a split number or a comma list of known class names (str), "
                        f"not {type(split).__name__}")
    return str(split)


def check_val_fraction(val_fraction) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.integer, np.floating)):
        raise TypeError(f"val_fraction must be a number in [0, 1), not {type(val_fraction).__name__}")
    return float(val_fraction)


def check_root(root) -> None:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path (str or os.PathLike), not {type(root).__name__}")


def check_model(model, num_known: int) -> None:
    """``model`` is a module whose classifier has the split's ``num_known`` outputs (when it can be told)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    from backmix.models import features_and_head
    try:
        outputs = features_and_head(model)[1].out_features
    except BackMixError:   # a model of another form: its logits are checked after the forward pass
        return
    if outputs != num_known:
        raise BackMixError(f"model has {outputs} outputs, but the split has {num_known} known classes")


def check_loader_model(train_loader, model) -> None:
    """``model`` classifies the classes ``train_loader`` (a backmix training loader) serves: what a
    rebuild takes its CAMs with."""
    index = getattr(train_loader, "index", None)
    labels = getattr(train_loader, "row_labels", None)
    if index is None or labels is None:
        raise TypeError(f"train_loader must be a backmix loader (backmix.loader(data, cache=DIR)), "
                        f"not {type(train_loader).__name__}")
    known = labels.label_map
    check_model(model, int((known >= 0).sum()) if known is not None else index.num_classes)


def check_eval_loader(test_loader, data) -> bool:
    """``test_loader`` is an evaluation loader of ``data``'s split, with batches: of its test folder, or
    of the validation rows of its training folder (``backmix.loader(data, train=False, validation=True)``).
    Returns whether it is the validation one."""
    index = getattr(test_loader, "index", None)
    labels = getattr(getattr(test_loader, "row_labels", None), "label_map", None)
    if index is None or labels is None or getattr(getattr(test_loader, "config", None), "train", False):
        raise TypeError(f"test_loader must be a backmix evaluation loader (backmix.loader(data, train=False)), "
                        f"not {type(test_loader).__name__}")
    rows = getattr(test_loader, "dataset_indices", None)
    validation = rows is not None and index.fingerprint() == data.train.fingerprint() and np.array_equal(
        np.sort(rows), np.sort(np.asarray(data.val_rows)))
    if not validation and index.fingerprint() != data.test.fingerprint():
        raise BackMixError(f"test_loader reads {index.root}, not the test folder {data.test.root} of data "
                           f"(nor its validation rows)")
    if not np.array_equal(labels, data.label_map):
        raise BackMixError("test_loader was made for another split than data (its known classes differ); "
                           "make it with backmix.loader(data, train=False)")
    if len(test_loader) == 0:
        raise BackMixError("test_loader yields no batches: nothing to evaluate")
    return validation
