"""Data: MAYE jsonl records, the synthetic data sets, the Qwen tokenizer and processor, and the
query + response sequence layout every forward pass uses.

`from maye_jax.data import Record, read_records, epoch_order, DataError` keeps working."""

from maye_jax.data.records import DataError, Record, check_files, epoch_order, read_records

__all__ = ["DataError", "Record", "check_files", "epoch_order", "read_records"]
