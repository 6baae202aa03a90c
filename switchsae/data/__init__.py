"""Activation sources: in-memory arrays, shard directories, and harvesting from transformers."""
