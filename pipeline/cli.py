"""Command-line entry points of the pipeline stage."""


def register_data(sub) -> None:
    """``backmix data write-beton``."""
    from .beton import register_data as reg
    reg(sub)
