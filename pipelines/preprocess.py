"""``python -m pipelines.preprocess``: raw Criteo TSV -> validated Parquet shards and vocabularies.

The command only; the code is :mod:`pipelines.data.preprocess`.
"""

from pipelines.data.preprocess import main

if __name__ == "__main__":
    main()
