"""``python -m pipelines.generate``: write a synthetic Criteo-format click log.

The command only; the code is :mod:`pipelines.data.generate`.
"""

from pipelines.data.generate import main

if __name__ == "__main__":
    main()
