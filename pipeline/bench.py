def register_bench(sub) -> None:
    pass
