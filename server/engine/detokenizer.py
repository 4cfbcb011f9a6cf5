"""Incremental detokenization and stop-sequence matching for streamed output.

`IncrementalDetokenizer` turns one token at a time into text deltas and holds back a delta
while it ends in an incomplete UTF-8 character (byte-level tokenizers split characters
across tokens). `StopChecker` finds stop sequences across token boundaries and holds back
any tail that could still become one, so no part of a stop sequence is ever streamed.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas (special tokens skipped)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # decode from here to get context for a clean join
        self.read_offset = 0  # text of ids[prefix_offset:read_offset] is already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            delta = text[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end, an incomplete character is emitted as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


class StopChecker:
    """Cuts the output at the first stop sequence; streams only text that cannot start one."""

    def __init__(self, stop_sequences: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stop_sequences if s]
        self.pending = ""  # held back: could be the start of a stop sequence

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop sequence was found)."""
        if not self.stops:
            return delta, False
        buffer = self.pending + delta
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buffer[: min(hits)], True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:size]):
                    hold = size
                    break
        self.pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
