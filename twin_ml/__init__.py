"""twin-ml: hybrid physics-ML surrogates for digital twins.

The top-level package is light: it never imports torch (the serving side depends on that).
"""

from twin_ml._version import __version__ as __version__
from twin_ml._version import code_version as code_version

__all__ = ["__version__", "code_version"]
