"""ray_aekd: distil an ensemble of teachers into one student with AE-KD, on Ray.

The core maths (``ray_aekd.weighting``, ``ray_aekd.losses``) imports only torch; Ray and
MLflow live in the outer layers.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ray-aekd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
