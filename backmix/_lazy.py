"""Lazy package exports (PEP 562): ``import backmix`` and ``backmix --help`` import no torch.

A package lists its public names and the submodule each lives in; the submodule
is imported the first time one of its names is used, then the name is cached in
the package. ``if TYPE_CHECKING`` imports beside each table keep IDEs and type
checkers exact.
"""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """(``__getattr__``, ``__dir__``) for ``package`` whose public ``name`` lives in ``exports[name]``
    (a module path relative to the package, e.g. ``".index"``)."""

    def __getattr__(name: str):
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
