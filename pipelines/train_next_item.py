"""``python -m pipelines.train_next_item``: a history encoder with an LSH or full-softmax output layer.

The command only; the code is :mod:`pipelines.training.next_item`.
"""

from pipelines.training.next_item import main

if __name__ == "__main__":
    main()
