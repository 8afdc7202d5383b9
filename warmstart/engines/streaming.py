"""Token ids → text deltas, safe for tokens that split multi-byte UTF-8 characters, with stop strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Detokenize = Callable[[Sequence[int]], str]


class TextStreamer:
    """Turn a growing list of token ids into text deltas.

    ``push(id)`` returns the new text that is certain: nothing while the last tokens decode to an
    incomplete character (U+FFFD at the end), and nothing that could still turn into a stop string.
    Once a stop string appears, ``stopped`` is True and the text before it is all that is ever
    returned. ``flush()`` returns what was held back at the end of a generation.
    """

    def __init__(
        self, detokenize: Detokenize, stop: Sequence[str] = (), *, prefix_ids: Sequence[int] = ()
    ) -> None:
        self._detok = detokenize
        self._stop = tuple(stop)
        self._ids: list[int] = list(prefix_ids)
        # decode windows start a few tokens back so tokenizers that strip a leading space stay correct
        self._prefix_off = 0
        self._read_off = len(self._ids)
        self._text = ""  # decoded generated text, complete characters only
        self._emitted = 0  # chars of _text already returned
        self.stopped = False

    @property
    def text(self) -> str:
        """Text returned so far."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._detok(self._ids[self._prefix_off : self._read_off])
        full = self._detok(self._ids[self._prefix_off :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # incomplete UTF-8 sequence: wait for the next token
        self._text += full[len(prefix) :]
        self._prefix_off, self._read_off = self._read_off, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Return held-back text at the end of a generation (incomplete characters included as U+FFFD)."""
        if self.stopped:
            return ""
        prefix = self._detok(self._ids[self._prefix_off : self._read_off])
        full = self._detok(self._ids[self._prefix_off :])
        if len(full) > len(prefix):
            self._text += full[len(prefix) :]
            self._prefix_off = self._read_off = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        start = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif final:
            end = len(self._text)
        else:  # hold back the longest tail that is a prefix of some stop string
            end = len(self._text) - _longest_stop_prefix_suffix(self._text, self._stop)
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        if self.stopped:
            self._text = self._text[:end]
        return out


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
