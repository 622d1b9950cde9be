"""Data layer: on-disk format readers, WebDataset shards, streaming pipelines, transforms, tokenizer."""
