"""The warmstart checkpoint format (normative specification: docs/format.md)."""

from warmstart.format.index import FileInfo, Index, PartitionInfo, TensorInfo
from warmstart.format.reader import Checkpoint, open_checkpoint
from warmstart.format.writer import save

open = open_checkpoint

__all__ = [
    "Checkpoint",
    "FileInfo",
    "Index",
    "PartitionInfo",
    "TensorInfo",
    "open",
    "open_checkpoint",
    "save",
]
