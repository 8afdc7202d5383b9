"""Exceptions of the scheduler: one type per failure, all under :class:`SchedulerError`."""

from __future__ import annotations

from warmstart.errors import InvalidModelName, WarmstartError

__all__ = ["InvalidModelName", "SchedulerError"]  # InvalidModelName is shared with the rest of warmstart


class SchedulerError(WarmstartError):
    """Base class of every error the scheduler raises on purpose."""


class BadRequest(SchedulerError, ValueError):
    """A request is malformed (bad JSON, bad types, unknown sampling keys, out-of-range values): a 400."""


class InvalidSamplingValue(BadRequest):
    """A sampling parameter is outside what the model allows (e.g. ``max_tokens`` above its limit)."""


class RequestBodyTooLarge(BadRequest):
    """A request body is larger than the front end accepts (HTTP 413)."""


class RequestBodyTimeout(BadRequest):
    """A request body did not arrive within the front end's read deadline (HTTP 408)."""


class InvalidSnapshotError(SchedulerError, ValueError):
    """A cluster-state snapshot is inconsistent (duplicate names, negative sizes, bad bandwidths...)."""


class UnknownModelError(SchedulerError, LookupError):
    """The snapshot has no :class:`~warmstart.scheduler.state.ModelSpec` with this name."""


class UnknownAdapterError(UnknownModelError):
    """A request names a LoRA adapter its base model does not serve (HTTP 404 / NOT_FOUND, naming those served)."""


class ModelNotInRepositoryError(UnknownModelError):
    """A deployed model that no server's Triton repository has a directory for (HTTP 404 / NOT_FOUND)."""


class UnplaceableModelError(SchedulerError):
    """No server can ever take a request for the model as configured; the message says which server lacks
    what (HTTP 503 / UNAVAILABLE, at once rather than after the cold-start timeout)."""


class UnknownServerError(SchedulerError, LookupError):
    """The snapshot has no server with this name."""


class CannotFitError(SchedulerError):
    """A server cannot make room for a model, even after evicting every idle model."""


class ClusterStateError(SchedulerError):
    """Base class of the failures of a cluster-state store (``warmstart.scheduler.state``, ``etcd_state``)."""


class RevisionConflictError(ClusterStateError):
    """A compare-and-set on the cluster-state store lost: the stored revision is not the expected one."""


class StaleEpochError(ClusterStateError):
    """A write fenced off: it carries an incarnation epoch that is not the server's current one (a newer
    incarnation of that node has registered since, or none ever did). Retrying cannot succeed."""


class LeaseNotFoundError(ClusterStateError, LookupError):
    """The lease was never granted, has expired or was revoked; grant a new one (and re-register)."""


class InvalidLeaseError(ClusterStateError, ValueError):
    """A lease TTL is not a whole number of seconds within the store's limits."""


class CorruptClusterStateError(ClusterStateError, ValueError):
    """A value read back from the store is not a valid record of the schema (bad JSON, wrong schema
    version or kind, a missing, unknown or mistyped field); the message names the key."""


class ClusterStateUnavailable(ClusterStateError):
    """The store (etcd) could not be reached or did not answer within the configured timeout."""


class MigrationError(SchedulerError):
    """Base class of live-migration failures; the source generation is still running when raised."""


class MigrationDestinationError(MigrationError):
    """The destination failed while replaying or starting; the source kept (or resumed) generating."""


class MigrationNotConvergingError(MigrationError):
    """The destination never caught up within the round limit; it was aborted, the source keeps going."""
