"""``python -m pipelines.train``: train a DLRM (dense or TT embeddings).

The command only; the code is :mod:`pipelines.training.dlrm`.
"""

from pipelines.training.dlrm import main

if __name__ == "__main__":
    main()
