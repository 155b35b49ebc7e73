"""``python -m pipelines.train_sequence``: the sequence-aware DLRM with an LSH attention.

The command only; the code is :mod:`pipelines.training.sequence`.
"""

from pipelines.training.sequence import main

if __name__ == "__main__":
    main()
