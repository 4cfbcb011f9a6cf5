"""Output handling: each sampled token becomes text for the caller, and every request ends once.

`append` takes a sampled token through the detokenizer and the stop checker and sends the new
text to the request's sink. `finish` is the single exit of the engine: every way out (finish,
abort, deadline, error, shutdown) goes through it, and it returns the sequence's KV blocks,
adapter pin and reference, and admission, then sends the last output.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from loraserve.engine.admission import Admission
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import FinishReason, Sequence, SequenceOutput, Status
from loraserve.errors import InternalError, ServeError

log = logging.getLogger(__name__)

# Reasons after which the text held back (an incomplete character, a possible stop-sequence
# prefix) is the request's own and is sent; after an error it is dropped.
FLUSHED = (FinishReason.EOS, FinishReason.LENGTH, FinishReason.TIME_LIMIT, FinishReason.CANCELLED)


class Outputs:
    """Turns tokens into outputs and ends requests, for one engine."""

    def __init__(
        self,
        scheduler: Scheduler,
        adapters: Any,
        admission: Admission,
        eos_ids: set[int],
        metrics: Any = None,
    ) -> None:
        self.scheduler = scheduler
        self.adapters = adapters  # adapters.manager.AdapterManager
        self.admission = admission
        self.eos_ids = eos_ids
        self.metrics = metrics

    def append(self, seq: Sequence, token: int) -> None:
        """Adds a sampled token; emits text; finishes the sequence when a stop condition holds."""
        now = time.monotonic()
        try:
            seq.output_ids.append(token)
            self.scheduler.charge_output(seq)
            if seq.first_token is None:
                seq.first_token = now
            elif self.metrics is not None:
                self.metrics.inter_token_latency.observe(now - seq.last_token)
            seq.last_token = now
            stopping = seq.request.stopping
            reason = None
            if token in self.eos_ids and not stopping.ignore_eos:
                reason = FinishReason.EOS
                text = ""
            else:
                text, stopped = seq.stop_checker.push(seq.detokenizer.add(token))
                if stopped:
                    reason = FinishReason.STOP_SEQUENCE
            if reason is None and len(seq.output_ids) >= stopping.max_new_tokens:
                reason = FinishReason.LENGTH
            if reason is not None:
                self.finish(seq, reason, pending_text=text, new_tokens=[token])
            else:
                self.emit(seq, SequenceOutput(text, [token]))
        except Exception as error:
            log.exception("request %s failed while appending a token", seq.request_id)
            self.finish(seq, FinishReason.ERROR, InternalError(f"output processing failed: {error}"))

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: ServeError | None = None,
        pending_text: str = "",
        new_tokens: list[int] | None = None,
    ) -> None:
        """Ends `seq` once, whatever the reason: the single exit of the engine.

        Takes it out of the scheduler (which returns its KV blocks and unpins its adapter's slot),
        releases its adapter and its admission, and sends its last output with the finish reason,
        usage and timings. Each release runs even when an earlier step fails, so that a fault here
        never leaks blocks, pins or the in-flight count; a second call does nothing.
        """
        if seq.finished:
            return
        try:
            self.scheduler.remove(seq)
        except Exception:
            log.exception("request %s: leaving the scheduler failed", seq.request_id)
        seq.status = Status.FINISHED
        text = pending_text
        if reason in FLUSHED:
            try:
                tail, _ = seq.stop_checker.push(seq.detokenizer.flush())
                text += tail + seq.stop_checker.flush()
            except Exception as failure:
                log.exception("request %s failed while flushing its text", seq.request_id)
                reason, error = FinishReason.ERROR, InternalError(f"output processing failed: {failure}")
        seq.finish_reason = reason
        if seq.adapter is not None:
            try:
                self.adapters.release(seq.adapter)
            except Exception:
                log.exception("request %s: releasing its adapter failed", seq.request_id)
        self.admission.leave(seq.tenant)
        self.emit(
            seq,
            SequenceOutput(
                text,
                new_tokens or [],
                reason,
                error,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                arrival=seq.request.arrival,
                first_scheduled=seq.first_scheduled,
                first_token=seq.first_token,
                finished=time.monotonic(),
                preemptions=seq.preemptions,
                cached_prompt_tokens=seq.cached_prompt_tokens,
            ),
        )

    def emit(self, seq: Sequence, output: SequenceOutput) -> None:
        """Sends one output to the request's sink; a failing sink (caller gone) loses only it."""
        try:
            seq.sink(output)
        except Exception:
            log.debug("dropping output of request %s: sink failed", seq.request_id, exc_info=True)
