"""``python -m pipelines.export``: write a training checkpoint as a servable export (:mod:`pipelines.export.writer`)."""

from pipelines.export.writer import main

if __name__ == "__main__":
    main()
