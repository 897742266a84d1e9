"""The instruments, apart from the library: the benchmarks (``backmix bench ...``), the experiment
runner (``backmix experiment``) and the sheet viewer (``backmix show``, ``backmix cache show``). They
may use every stage; nothing in the stages imports them (tests/test_layout.py). Installed as
``backmix.bench``."""
