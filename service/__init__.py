"""The HTTP service: score, rank and recommend with an exported DLRM (``python -m service --help``)."""
