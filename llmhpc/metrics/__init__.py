"""Metrics: console progress, metrics.jsonl, W&B, MFU."""
