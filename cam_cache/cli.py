"""``backmix cache ...`` and ``backmix bench cache`` (filled in by the cache issue)."""


def register(sub) -> None:
    pass


def register_bench(sub) -> None:
    pass
