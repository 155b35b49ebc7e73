"""One logging set-up for every command and the service: readable lines, the libraries' chatter silenced.

Why here: the training commands and the service both call it, and the service must not import
the pipelines.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OURS = ("pipelines", "recsys", "kernels", "service", "uvicorn", "uvicorn.error", "uvicorn.access")
NOISY = ("torchrec", "torch", "fbgemm_gpu")


def _drop_library_chatter(record: logging.LogRecord) -> bool:
    """torchrec and fbgemm log planner notes as root-logger warnings; keep only their errors."""
    noisy = any(part in record.pathname for part in ("/torchrec/", "/fbgemm_gpu/", "/torch/"))
    return record.levelno >= logging.ERROR or not noisy


def setup_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Our loggers at ``level`` on stderr (and ``log_file``), torch/torchrec/fbgemm at ERROR, their warnings off."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.addFilter(_drop_library_chatter)
    logging.basicConfig(level=logging.WARNING, format=FORMAT, handlers=handlers, force=True)
    for ours in OURS:
        logging.getLogger(ours).setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|torchrec|fbgemm_gpu)(\.|$)")
