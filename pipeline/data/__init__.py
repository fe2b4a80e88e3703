"""Dataset adapters, the synthetic benchmark, and the prepared Parquet tables."""
