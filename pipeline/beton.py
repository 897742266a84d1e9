def register_data(sub) -> None:
    pass
