"""Data movement: the synthetic generators, raw TSV reading, preprocessing to Parquet, and the batch loaders."""
