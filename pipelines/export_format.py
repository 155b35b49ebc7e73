"""Moved: the export format and runtime are :mod:`recsys.serving` (the service must not import the pipelines).

Scripts that did ``from pipelines.export_format import load_exported`` keep working through this alias.
"""

import warnings

from recsys.serving import *  # noqa: F403
from recsys.serving import __all__  # noqa: F401

warnings.warn("pipelines.export_format moved to recsys.serving; import from there", DeprecationWarning, stacklevel=2)
