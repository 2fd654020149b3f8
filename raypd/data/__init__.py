"""Training data: in-memory data sets for local mode (WebDataset shards for clusters)."""

from raypd.data.batch import Batch
from raypd.data.memory import ImageBatches, load_digits

__all__ = ["Batch", "ImageBatches", "load_digits"]
