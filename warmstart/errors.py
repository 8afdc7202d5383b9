"""Every failure warmstart reports has its own exception type under :class:`WarmstartError`.

Messages say what is wrong and what to do about it.
"""

from __future__ import annotations


class WarmstartError(Exception):
    """Base class of every error raised by warmstart."""


# --- checkpoints -------------------------------------------------------------------------------------------


class CheckpointError(WarmstartError):
    """A checkpoint cannot be read or written."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint (no ``index.json``) exists at the given location."""


class CheckpointExists(CheckpointError, FileExistsError):
    """The destination of a write already holds something and overwrite was not asked for."""


class CorruptCheckpoint(CheckpointError):
    """The checkpoint's bytes or index contradict the format specification."""


class IndexTooLarge(CorruptCheckpoint):
    """``index.json`` is larger than the format's limit."""


class MalformedIndex(CorruptCheckpoint):
    """``index.json`` is not valid JSON, or a field is missing, unknown or of the wrong type."""


class UnsupportedVersion(CorruptCheckpoint):
    """The checkpoint was written with a format version this reader does not know."""


class UnknownDtype(CorruptCheckpoint):
    """A tensor declares a dtype name that is not in the specification."""


class InvalidTensorName(CorruptCheckpoint):
    """A tensor name is empty, too long, or uses characters outside the allowed set."""


class DuplicateTensorName(CorruptCheckpoint):
    """Two tensors share one name."""


class UnsafeFileName(CorruptCheckpoint):
    """A partition or model file name could escape the checkpoint directory."""


class LimitExceeded(CorruptCheckpoint):
    """A count or size exceeds a limit of the specification (tensors, partitions, rank, ...)."""


class InvalidShape(CorruptCheckpoint):
    """A tensor shape has negative dimensions or too many of them."""


class SizeMismatch(CorruptCheckpoint):
    """A tensor's ``nbytes`` differs from ``prod(shape) * itemsize``."""


class MisalignedOffset(CorruptCheckpoint):
    """A tensor offset is not a multiple of the checkpoint's alignment."""


class OffsetOutOfRange(CorruptCheckpoint):
    """A tensor lies (partly) outside its partition, or names a partition that does not exist."""


class OverlappingTensors(CorruptCheckpoint):
    """Two tensors share bytes of one partition."""


class TruncatedPartition(CorruptCheckpoint):
    """A partition file is shorter (or longer) than the index says."""


class ChecksumMismatch(CorruptCheckpoint):
    """A chunk's bytes do not hash to the checksum recorded in the index."""

    def __init__(self, message: str, *, file: str, chunk: int, start: int, end: int) -> None:
        super().__init__(message)
        self.file = file
        self.chunk = chunk
        self.start = start
        self.end = end


class SealBroken(CorruptCheckpoint):
    """A cached copy's files changed after the copy was verified and sealed (see docs/loaders.md)."""


class TensorNotFound(CheckpointError, KeyError):
    """The checkpoint has no tensor of the requested name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedTensor(CheckpointError, TypeError):
    """An object given to the writer is not a numpy array, torch tensor or jax array of a known dtype."""


class InvalidURI(WarmstartError, ValueError):
    """A checkpoint location is neither a local path nor a supported URI."""


class SourceError(WarmstartError, OSError):
    """Reading or writing bytes at a checkpoint location failed (I/O or network)."""


class RemoteTimeout(SourceError, TimeoutError):
    """A remote read did not complete within its deadline (``WARMSTART_REMOTE_TIMEOUT_S``, docs/loaders.md)."""


class InvalidRemoteTimeout(WarmstartError, ValueError):
    """``WARMSTART_REMOTE_TIMEOUT_S`` is not a positive number of seconds."""


class ConversionError(WarmstartError):
    """A source model cannot be converted into a warmstart checkpoint."""


class PickleRefused(ConversionError):
    """A pickle-based input was given without ``--allow-pickle``."""


class MissingDependency(WarmstartError, ImportError):
    """An optional dependency needed for this operation is not installed."""


# --- conversion (appended by the converters) ---------------------------------------------------------------


class SourceNotFound(ConversionError, FileNotFoundError):
    """The conversion source path does not exist."""


class UnknownSourceFormat(ConversionError):
    """The conversion source is none of the supported kinds (HF directory, safetensors, GGUF, orbax, warmstart)."""


class InvalidSource(ConversionError):
    """The conversion source is of a known kind but its contents are malformed or incomplete."""


class UnsupportedSourceDtype(ConversionError):
    """A source tensor has a dtype the warmstart format cannot store."""


class ExportError(ConversionError):
    """A checkpoint cannot be exported to the requested format."""


class InvalidSize(WarmstartError, ValueError):
    """A size string (``512MiB``, ``1G``, ``4096``) cannot be parsed."""


# --- loaders, caches and the node store ---------------------------------------------------------------------


class CacheError(WarmstartError):
    """A node cache tier (host memory or local disk) cannot serve or store a checkpoint."""


class CacheFull(CacheError):
    """A cache tier has no room for a checkpoint, even after evicting everything not in use."""

    def __init__(self, message: str, *, tier: str = "", needed: int = 0, capacity: int = 0) -> None:
        super().__init__(message)
        self.tier = tier
        self.needed = needed
        self.capacity = capacity


class StorageFull(CacheFull):
    """The file system under a cache tier ran out of space while a checkpoint was being written into it."""


class EntryInUse(CacheError):
    """A cached checkpoint cannot be evicted or replaced because a process is using it."""


class InvalidModelName(WarmstartError, ValueError):
    """A model name is not a plain name (``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``, no ``..``)."""


class ModelNotFound(WarmstartError, FileNotFoundError):
    """A bare model name was given, but no node store is configured or the store's remote lacks it."""


class StoreError(WarmstartError):
    """The node store daemon failed a request or cannot be reached."""


class StoreUnavailable(StoreError, ConnectionError):
    """No node store answers at the configured address."""


class DeviceUnavailable(WarmstartError, RuntimeError):
    """The requested device (e.g. ``cuda``) is not present or not supported by the installed frameworks."""


class InvalidDevice(WarmstartError, ValueError):
    """A device string is not ``cpu``, ``cuda`` or ``cuda:N`` (see :mod:`warmstart.devices`)."""


class DeviceConflict(InvalidDevice):
    """A model's ``device`` parameter contradicts the GPU Triton placed its instance on (``KIND_GPU``)."""


# --- hostile files (appended: checkpoint readers and converters refuse what is not a plain file) ----------


class NotARegularFile(CorruptCheckpoint):
    """A checkpoint file (``index.json``, a partition, a model file) is a FIFO, device, socket or directory."""


class FileOutsideCheckpoint(UnsafeFileName):
    """A checkpoint file is a symbolic link that resolves outside the checkpoint directory."""


class DuplicateKey(MalformedIndex):
    """A JSON object in ``index.json`` has the same key twice (JSON parsers disagree on which one wins)."""


class NonFiniteNumber(MalformedIndex):
    """``index.json`` holds ``NaN``, ``Infinity`` or a number too large for a float (not JSON numbers)."""


class IndexTooDeep(MalformedIndex):
    """``index.json`` nests arrays/objects deeper than the format's limit."""


class SourceNotARegularFile(InvalidSource):
    """A conversion source file (safetensors, GGUF, config) is a FIFO, device, socket or directory."""


class MalformedSafetensors(InvalidSource):
    """A safetensors file's header is not what the safetensors format allows (JSON, entries, offsets)."""


class MalformedGGUF(InvalidSource):
    """A GGUF file's header contradicts itself or the file (counts, lengths, types or offsets beyond it)."""
