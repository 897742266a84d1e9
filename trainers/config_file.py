"""``backmix train --config run.yaml``: a YAML mapping whose keys are the train options (the
``TrainConfig`` field names, ``batch_size`` or ``batch-size``); the command line overrides it.
Every run writes RUN/config.yaml (beside config.json) in this form, so it can be passed back.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.limits import MAX_CONFIG_BYTES, MAX_CONFIG_VALUES, quoted, read_bounded

from .config import TrainConfig, option

# The Python type each field's value must have in the file (None also where the field may be None).
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list,)}


def _field_types() -> dict[str, tuple[tuple[type, ...], bool]]:
    out = {}
    for f in dataclasses.fields(TrainConfig):
        hint = str(f.type)
        optional = hint.startswith("Optional[")
        out[f.name] = (_TYPES[hint.removeprefix("Optional[").removesuffix("]")], optional)
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """The options of a YAML config file as ``TrainConfig`` field values (types checked, not ranges:
    those are checked with the command line's values merged in)."""
    path = Path(path)
    types = _field_types()
    out = {}
    for key, value in _option_pairs(path):
        name = str(key).replace("-", "_")
        if name not in types:
            raise BackMixError(f"--config {path}: unknown option {quoted(key)} (the keys are `backmix train` "
                               f"options, e.g. batch_size)")
        if name in out:
            raise BackMixError(f"--config {path} gives {option(name)} twice")
        allowed, optional = types[name]
        if name == "split" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)   # `split: 3` is the split number
        ok = (value is None and optional) or (isinstance(value, allowed)
                                              and not (isinstance(value, bool) and bool not in allowed))
        if not ok:
            want = " or ".join(t.__name__ for t in allowed) + (" or null" if optional else "")
            raise BackMixError(f"--config {path}: {key} must be {want}, got {quoted(value)}")
        out[name] = float(value) if float in allowed and value is not None else value
    return out


def _option_pairs(path: Path) -> list[tuple]:
    """The file's (key, value) pairs in order, duplicates kept (a dict would keep the last silently).
    The file is a regular one of at most ``MAX_CONFIG_BYTES``, UTF-8, and holds at most
    ``MAX_CONFIG_VALUES`` values with its aliases expanded (a few hundred bytes of aliases can stand
    for billions of values)."""
    import yaml
    try:
        text = read_bounded(path, "--config", MAX_CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise BackMixError(f"--config {path} is not UTF-8 text") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return []
        if expanded_size(root, MAX_CONFIG_VALUES.value()) is None:
            raise BackMixError(f"--config {path} holds more than {MAX_CONFIG_VALUES.value()} values once its "
                               f"YAML aliases are expanded ({MAX_CONFIG_VALUES.env})")
        if not isinstance(root, yaml.MappingNode):
            value = loader.construct_document(root)
            if value is None:   # `~` alone: no options
                return []
            raise BackMixError(f"--config {path} must be a mapping of option: value, not a {type(value).__name__}")
        return [(loader.construct_document(k), loader.construct_document(v)) for k, v in root.value]
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise BackMixError(f"--config {path} is not valid YAML"
                           + (f" (line {where.line + 1})" if where else "")) from None
    except RecursionError:
        raise BackMixError(f"--config {path} is nested too deep") from None
    finally:
        loader.dispose()


def expanded_size(root, most: int):
    """How many nodes the YAML node ``root`` stands for with every alias expanded; None when over ``most``
    or endless (an alias inside its own anchor). Counted once per node, not per use: no expansion."""
    import yaml

    def children(node):
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return node.value if isinstance(node, yaml.SequenceNode) else []

    size: dict[int, int] = {}
    open_nodes: set[int] = set()     # entered, not finished: the ancestors of the node popped
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children(node))
            if size[id(node)] > most:
                return None
        elif id(node) in open_nodes:
            return None
        elif id(node) not in size:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children(node) if id(c) not in size)
    return size[id(root)]


def write_config_yaml(path: Path, cfg: TrainConfig) -> None:
    """RUN/config.yaml: every field, in the dataclass's order, readable by ``--config``."""
    import yaml

    from backmix._fs import atomic_write_bytes
    header = "# backmix train options of this run; pass it back with `backmix train --config`\n"
    atomic_write_bytes(path, (header + yaml.safe_dump(cfg.to_dict(), sort_keys=False)).encode())
