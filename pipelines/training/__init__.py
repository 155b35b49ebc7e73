"""Training: the one loop (:mod:`~pipelines.training.engine`) and the tasks of the four training commands.

- :mod:`~pipelines.training.dlrm`: DLRM on Criteo data, dense or TT tables, under ``torchrun`` too.
- :mod:`~pipelines.training.xmc` / :mod:`~pipelines.training.next_item`: an encoder and an LSH or full-softmax
  output layer (:mod:`~pipelines.training.output_layer`).
- :mod:`~pipelines.training.sequence`: the sequence-aware DLRM with an LSH attention.
- checkpoints, evaluation and the ``torchrun`` set-up they share.
"""
