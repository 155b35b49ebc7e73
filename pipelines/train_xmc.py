"""``python -m pipelines.train_xmc``: an encoder with an LSH or full-softmax output layer on XMC data.

The command only; the code is :mod:`pipelines.training.xmc`.
"""

from pipelines.training.xmc import main

if __name__ == "__main__":
    main()
