"""The export writer: a training checkpoint -> the self-describing directory ``recsys.serving`` loads.

``python -m pipelines.export`` runs :func:`pipelines.export.writer.main`; the format itself (and the
runtime that reads it) is :mod:`recsys.serving`, which the service imports without the pipelines.
"""

from pipelines.export.writer import export_checkpoint, main

__all__ = ["export_checkpoint", "main"]
