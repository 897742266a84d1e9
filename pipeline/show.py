def register(top) -> None:
    pass
