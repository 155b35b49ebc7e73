"""The serving runtime: the export format and the model an export becomes, apart from training.

Imports only ``kernels``, ``recsys`` and torch, numpy, pyarrow and safetensors; never torchrec or
``pipelines`` (a test checks ``sys.modules`` of a fresh ``import service``). The export writer
(``pipelines.export``) and the service (``service``) both use it.

- :mod:`recsys.serving.format`: manifest, sha256, safetensors files, quantized cores.
- :mod:`recsys.serving.features`: raw Criteo values -> table indices (shared with preprocessing).
- :mod:`recsys.serving.dlrm`: the DLRM in plain torch with torchrec's state-dict keys.
- :mod:`recsys.serving.runtime`: :func:`load_exported` -> :class:`ExportedModel` (scoring, retrieval).
"""

from recsys.serving.features import FeatureEncoder
from recsys.serving.format import (
    CORE_DTYPES,
    FEATURES_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEX_PATTERN,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    MAX_DENSE_ABS,
    MODEL_FILE,
    READABLE_VERSIONS,
    RETRIEVAL_FILE,
    SCALE_SUFFIX,
    ExportFormatError,
    dequantize,
    finite_or_none,
    quantize,
    read_manifest,
    read_tensors,
    sha256_bytes,
    write_export,
)
from recsys.serving.runtime import (
    CATALOGUE_KEY,
    HISTORY_ENCODER_KIND,
    RETRIEVAL_LAYER_KEYS,
    SEQUENCE_TRANSFORMER_KIND,
    ExportedModel,
    Retrieval,
    build_model,
    load_exported,
    model_from_tensors,
    serving_state_keys,
    tt_core_names,
)

__all__ = [
    "CATALOGUE_KEY",
    "CORE_DTYPES",
    "FEATURES_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "HEX_PATTERN",
    "HISTORY_ENCODER_KIND",
    "MANIFEST_DIGEST_FILE",
    "MANIFEST_FILE",
    "MAX_DENSE_ABS",
    "MODEL_FILE",
    "READABLE_VERSIONS",
    "RETRIEVAL_FILE",
    "RETRIEVAL_LAYER_KEYS",
    "SCALE_SUFFIX",
    "SEQUENCE_TRANSFORMER_KIND",
    "ExportFormatError",
    "ExportedModel",
    "FeatureEncoder",
    "Retrieval",
    "build_model",
    "dequantize",
    "finite_or_none",
    "load_exported",
    "model_from_tensors",
    "quantize",
    "read_manifest",
    "read_tensors",
    "serving_state_keys",
    "sha256_bytes",
    "tt_core_names",
    "write_export",
]
