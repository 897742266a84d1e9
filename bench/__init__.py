"""The instruments: benchmarks of the stages, apart from the library (nothing in the stages imports
them). Installed as ``backmix.bench``."""
