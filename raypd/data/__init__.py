"""Training data: WebDataset shards in (from every layout a data set comes in), batches out."""

from raypd.data.batch import Batch

__all__ = ["Batch"]
