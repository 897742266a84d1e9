"""``backmix train --config run.yaml``: a YAML mapping whose keys are the train options (the
``TrainConfig`` field names, ``batch_size`` or ``batch-size``); the command line overrides it.
Every run writes RUN/config.yaml (beside config.json) in this form, so it can be passed back.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from backmix.osr_data.errors import BackMixError

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
    import yaml
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BackMixError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise BackMixError(f"--config {path} is not valid YAML"
                           + (f" (line {where.line + 1})" if where else "")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise BackMixError(f"--config {path} must be a mapping of option: value, not a {type(values).__name__}")
    types = _field_types()
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in types:
            raise BackMixError(f"--config {path}: unknown option {key!r} (the keys are `backmix train` options, "
                               f"e.g. batch_size)")
        if name in out:
            raise BackMixError(f"--config {path} gives {option(name)} twice")
        allowed, optional = types[name]
        if name == "split" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)   # `split: 3` is the split number
        ok = (value is None and optional) or (isinstance(value, allowed)
                                              and not (isinstance(value, bool) and bool not in allowed))
        if not ok:
            want = " or ".join(t.__name__ for t in allowed) + (" or null" if optional else "")
            raise BackMixError(f"--config {path}: {key} must be {want}, got {value!r}")
        out[name] = float(value) if float in allowed else value
    return out


def write_config_yaml(path: Path, cfg: TrainConfig) -> None:
    """RUN/config.yaml: every field, in the dataclass's order, readable by ``--config``."""
    import yaml

    from backmix._fs import atomic_write_bytes
    header = "# backmix train options of this run; pass it back with `backmix train --config`\n"
    atomic_write_bytes(path, (header + yaml.safe_dump(cfg.to_dict(), sort_keys=False)).encode())
