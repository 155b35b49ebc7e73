"""``python -m pipelines.compress``: a trained dense DLRM -> a TT run (TT-SVD, then fine-tuning).

The command only; the code is :mod:`pipelines.training.compress`.
"""

from pipelines.training.compress import main

if __name__ == "__main__":
    main()
