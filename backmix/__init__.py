"""backmix: fast data loading for open-set recognition with the BackMix regularizer.

The stages are subpackages: ``backmix.osr_data`` (image folders, splits) ->
``backmix.models`` (build, checkpoint, CAM heads) -> ``backmix.cam_cache`` (foreground
maps) -> ``backmix.pipeline`` (loaders) -> ``backmix.trainers``. In the repository
they are top-level folders, mapped under the ``backmix`` name by pyproject's
package-dir, so installing backmix adds no generic top-level packages.
"""
__version__ = "0.1.0"
