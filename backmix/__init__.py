"""backmix: fast data loading for open-set recognition with the BackMix regularizer.

The stages are sibling packages: ``osr_data`` (image folders, splits) ->
``cam_cache`` (foreground maps) -> ``pipeline`` (loaders) -> ``trainers``.
This package holds only the ``backmix`` command line that ties them together.
"""
__version__ = "0.1.0"
