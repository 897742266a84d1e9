"""Command-line entry points of the pipeline stage."""


def register_data(sub) -> None:
    """``backmix data write-beton``."""
    from .beton import register_data as reg
    reg(sub)


def register_bench(sub) -> None:
    """``backmix bench loader``."""
    from .bench import register_bench as reg
    reg(sub)


def register_bench_peers(sub) -> None:
    """``backmix bench peers``."""
    from .bench_peers import register as reg
    reg(sub)


def register(top) -> None:
    """``backmix show``."""
    from .show import register as reg
    reg(top)


def register_cache_show(sub) -> None:
    """``backmix cache show``: drawn here, where the mix kernel lives."""
    from .show import register_cache_show as reg
    reg(sub)
