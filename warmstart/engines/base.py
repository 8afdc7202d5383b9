"""The interface every generation engine implements, and the engines' exceptions.

An engine owns model weights and KV caches and does two things: prefill a new sequence
(``new_sequence``) and run one batched decode step for several sequences (``step``). It knows
nothing about sampling, stopping or threads; `warmstart.engines.generator` does that on top.
Engines are not thread-safe: one thread (the generator's) drives each engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


class EngineError(Exception):
    """Base class of every error raised by `warmstart.engines`."""


class EmptyPrompt(EngineError, ValueError):
    """A generation was asked for with no prompt tokens."""


class PromptTooLong(EngineError, ValueError):
    """Prompt (plus tokens already generated) does not fit the engine's context."""


class InvalidTokenId(EngineError, ValueError):
    """A token id is outside ``[0, vocab_size)``."""


class InvalidSamplingParams(EngineError, ValueError):
    """Sampling parameters are malformed or out of range."""


class UnsupportedModel(EngineError, ValueError):
    """The model config uses a feature this engine does not implement."""


class UnknownEngineKind(EngineError, ValueError):
    """`build_engine` was asked for an engine kind that does not exist."""


class MissingWeight(EngineError, KeyError):
    """A tensor the model needs is absent from the weights dict."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BadWeightShape(EngineError, ValueError):
    """A tensor in the weights dict has a shape that does not match the config."""


class NoFreeSlot(EngineError, RuntimeError):
    """Every KV-cache slot of a fixed-capacity engine is in use."""


class ContextFull(EngineError, RuntimeError):
    """A sequence already holds ``max_context`` tokens; it cannot take another."""


class GeneratorClosed(EngineError, RuntimeError):
    """The generator was closed; no request is accepted or continued."""


@dataclass(eq=False)
class SeqState:
    """One live sequence in an engine.

    ``length`` counts tokens already in the KV cache; ``logits`` ([vocab] float32) predict the token
    at position ``length``. ``handle`` is engine-private (a cache slot, a per-sequence cache...).
    """

    length: int
    logits: np.ndarray  # [vocab] float32
    handle: object = field(default=None, repr=False)
    released: bool = False
    adapter: int = -1  # the LoRA adapter slot its rows use (warmstart.engines.adapters); -1: the base alone


@runtime_checkable
class Engine(Protocol):
    """What `BatchedGenerator` needs from an engine."""

    eos_token_ids: frozenset[int]
    max_context: int  # tokens a sequence may hold, prompt included
    vocab_size: int
    max_batch: int  # sequences that may be alive at once

    def new_sequence(self, token_ids: Sequence[int]) -> SeqState:
        """Prefill ``token_ids`` into a fresh sequence; its logits predict the next token."""
        ...

    def step(self, states: Sequence[SeqState], token_ids: Sequence[int]) -> None:
        """Append one token to each sequence in one batched forward; update each state in place."""
        ...

    def release(self, state: SeqState) -> None:
        """Free the sequence's cache. Releasing twice is a no-op."""
        ...


def check_prompt(token_ids: Sequence[int], *, vocab_size: int, max_context: int) -> None:
    """Raise `EmptyPrompt`, `PromptTooLong` or `InvalidTokenId` for a prompt an engine cannot take."""
    if len(token_ids) == 0:
        raise EmptyPrompt("prompt has no tokens; pass at least one token id (e.g. a BOS token)")
    if len(token_ids) >= max_context:
        raise PromptTooLong(
            f"prompt of {len(token_ids)} tokens leaves no room to generate in a context of "
            f"{max_context}; shorten the prompt to at most {max_context - 1} tokens"
        )
    check_token_ids(token_ids, vocab_size=vocab_size)


def check_token_ids(token_ids: Sequence[int], *, vocab_size: int) -> None:
    """Raise `InvalidTokenId` unless every id is an int in ``[0, vocab_size)``."""
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or not 0 <= t < vocab_size:
            raise InvalidTokenId(f"token id {t!r} at index {i} is not an int in [0, {vocab_size})")


def eos_ids_from_config(config: dict) -> frozenset[int]:
    """EOS ids from an HF config dict (``eos_token_id`` is an int, a list, or absent)."""
    eos = config.get("eos_token_id")
    if eos is None:
        return frozenset()
    if isinstance(eos, int):
        return frozenset({eos})
    return frozenset(int(e) for e in eos)
