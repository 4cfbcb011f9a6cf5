"""The `loraserve.v1` services as thin gRPC front ends over the generation core and the admin verbs.

Each method reads its protobuf request into plain values (checked by loraserve.validation, the
adapter id and the caller's right to it by the guard), calls loraserve.generation or
loraserve.admin, and writes the result back as protobuf. Errors are ServeErrors raised on the
way; the front end's error boundary (loraserve.handlers for `loraserve serve`, loraserve.ray_app
for Ray Serve) reports them. Nothing here touches a gRPC context.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from loraserve.adapters.registry import AdapterInfo
from loraserve.admin import AdapterAdmin
from loraserve.engine.sequence import FinishReason
from loraserve.generation import Completion, FinalRecord, GenerationCore, GenerationInput
from loraserve.guard import Call, Guard
from loraserve.training.jobs import JobRecord, JobState
from loraserve.training.manager import TrainingManager
from loraserve.training.spec import JobRequest
from loraserve.validation import StoppingSpec, check_messages, check_sampling
from loraserve.wiring import Services
from loraserve_client.api import loraserve_pb2 as pb2

FINISH_REASONS = {
    FinishReason.LENGTH: pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb2.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.TIME_LIMIT: pb2.FINISH_REASON_TIME_LIMIT,
}
ADAPTER_STATES = {
    "disk": pb2.ADAPTER_STATE_DISK,
    "host": pb2.ADAPTER_STATE_HOST,
    "device": pb2.ADAPTER_STATE_DEVICE,
}


def stopping_spec(request: Any) -> StoppingSpec:
    if not request.HasField("stopping"):
        return StoppingSpec()
    stopping = request.stopping
    return StoppingSpec(
        max_new_tokens=stopping.max_new_tokens,
        stop_sequences=tuple(stopping.stop_sequences),
        max_time_seconds=stopping.max_time_seconds,
        ignore_eos=stopping.ignore_eos,
    )


def usage(final: FinalRecord) -> pb2.Usage:
    return pb2.Usage(
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
        total_tokens=final.usage.total_tokens,
        cached_prompt_tokens=final.usage.cached_prompt_tokens,
    )


def response(completion: Completion, request_id: str) -> pb2.GenerateResponse:
    return pb2.GenerateResponse(
        text=completion.text,
        token_ids=completion.token_ids,
        finish_reason=FINISH_REASONS[completion.final.finish_reason],
        usage=usage(completion.final),
        request_id=request_id,
    )


class InferenceService:
    """`loraserve.v1.Inference` over the generation core."""

    def __init__(self, core: GenerationCore) -> None:
        self.core = core
        self.limits = core.limits

    def _input(self, request: Any, call: Call) -> GenerationInput:
        adapter_id = Guard.adapter(call, request.adapter_id)
        sampling = check_sampling(request.sampling, request.HasField("sampling"))
        chat = isinstance(request, pb2.ChatRequest)
        return GenerationInput(
            request_id=call.request_id,
            adapter_id=adapter_id,
            prompt=None if chat else request.prompt,
            messages=check_messages(request.messages, self.limits) if chat else (),
            sampling=sampling,
            stopping=stopping_spec(request),
            tenant=call.principal.tenant,
            deadline=call.deadline,
            method=call.method.rsplit("/", 1)[-1],
        )

    async def _complete(self, request: Any, call: Call) -> pb2.GenerateResponse:
        return response(await self.core.complete(self._input(request, call)), call.request_id)

    async def _stream(self, request: Any, call: Call) -> AsyncIterator[pb2.GenerateStreamResponse]:
        async for delta in self.core.stream(self._input(request, call)):
            message = pb2.GenerateStreamResponse(
                text=delta.text, token_ids=delta.token_ids, request_id=call.request_id
            )
            if delta.final is not None:
                message.finish_reason = FINISH_REASONS[delta.final.finish_reason]
                message.usage.CopyFrom(usage(delta.final))
            yield message

    async def Generate(self, request: pb2.GenerateRequest, call: Call) -> pb2.GenerateResponse:
        return await self._complete(request, call)

    async def Chat(self, request: pb2.ChatRequest, call: Call) -> pb2.GenerateResponse:
        return await self._complete(request, call)

    async def GenerateStream(
        self, request: pb2.GenerateRequest, call: Call
    ) -> AsyncIterator[pb2.GenerateStreamResponse]:
        async for message in self._stream(request, call):
            yield message

    async def ChatStream(
        self, request: pb2.ChatRequest, call: Call
    ) -> AsyncIterator[pb2.GenerateStreamResponse]:
        async for message in self._stream(request, call):
            yield message

    async def Tokenize(self, request: pb2.TokenizeRequest, call: Call) -> pb2.TokenizeResponse:
        if len(request.messages):
            ids = await self.core.tokenize(messages=check_messages(request.messages, self.limits))
        else:
            ids = await self.core.tokenize(prompt=request.prompt)
        return pb2.TokenizeResponse(token_ids=ids, tokens=self.core.tokens(ids))

    async def ModelInfo(self, request: pb2.ModelInfoRequest, call: Call) -> pb2.ModelInfoResponse:
        d = self.core.describe_model()
        return pb2.ModelInfoResponse(
            model=d.model,
            architecture=d.architecture,
            quantization=d.quantization,
            compute_dtype=d.compute_dtype,
            device=d.device,
            max_context_length=d.max_context_length,
            vocab_size=d.vocab_size,
            max_lora_rank=d.max_lora_rank,
            max_loaded_adapters=d.max_loaded_adapters,
            lora_target_modules=d.lora_target_modules,
            server_version=d.server_version,
            model_bytes=d.model_bytes,
        )


def adapter_info(row: AdapterInfo) -> pb2.AdapterInfo:
    return pb2.AdapterInfo(
        adapter_id=row.adapter_id,
        state=ADAPTER_STATES[row.tier],
        rank=row.rank,
        target_modules=list(row.targets),
        bytes=row.bytes,
        in_flight_requests=row.in_flight,
        pinned=row.pinned,
        draining=row.draining,
        last_used_unix_seconds=row.last_used,
        slot=row.slot,
    )


class AdapterAdminService:
    """`loraserve.v1.AdapterAdmin` over the admin verbs (the guard has checked the admin right)."""

    def __init__(self, admin: AdapterAdmin) -> None:
        self.admin = admin
        self.adapters = admin.adapters

    async def LoadAdapter(self, request: pb2.LoadAdapterRequest, call: Call) -> pb2.LoadAdapterResponse:
        outcome = await self.admin.load(Guard.admin_adapter(request.adapter_id), request.pin)
        return pb2.LoadAdapterResponse(
            adapter=adapter_info(outcome.adapter),
            reloaded=outcome.reloaded,
            load_seconds=outcome.load_seconds,
        )

    async def UnloadAdapter(self, request: pb2.UnloadAdapterRequest, call: Call) -> pb2.UnloadAdapterResponse:
        row = self.admin.unload(Guard.admin_adapter(request.adapter_id))
        return pb2.UnloadAdapterResponse(adapter=adapter_info(row))

    async def ListAdapters(self, request: pb2.ListAdaptersRequest, call: Call) -> pb2.ListAdaptersResponse:
        if request.include_disk:  # lists the store's folders: off the event loop
            rows = await asyncio.to_thread(self.admin.list, True)
        else:
            rows = self.admin.list()
        return pb2.ListAdaptersResponse(adapters=[adapter_info(row) for row in rows])


TRAINING_STATES = {
    JobState.QUEUED: pb2.TRAINING_STATE_QUEUED,
    JobState.RUNNING: pb2.TRAINING_STATE_RUNNING,
    JobState.SUCCEEDED: pb2.TRAINING_STATE_SUCCEEDED,
    JobState.FAILED: pb2.TRAINING_STATE_FAILED,
    JobState.CANCELLED: pb2.TRAINING_STATE_CANCELLED,
}


def training_job(record: JobRecord) -> pb2.TrainingJob:
    job = pb2.TrainingJob(
        job_id=record.job_id,
        adapter_id=record.adapter_id,
        state=TRAINING_STATES[record.state],
        step=record.step,
        total_steps=record.total_steps,
        loss=record.loss,
        error=record.error,
        created_unix_seconds=record.created,
        started_unix_seconds=record.started,
        finished_unix_seconds=record.finished,
        tenant=record.tenant,
        eval_examples=record.eval_examples,
        train_examples=record.train_examples,
    )
    if record.eval_exact_match is not None:
        job.eval_exact_match = record.eval_exact_match
    return job


def _decimal(value: float) -> float:
    """A proto float (float32) as the decimal the client wrote: 0.003, not 0.0030000000260770321."""
    return float(f"{value:.7g}")


def job_request(request: pb2.CreateTrainingJobRequest) -> JobRequest:
    options = request.options
    return JobRequest(
        adapter_id=Guard.admin_adapter(request.adapter_id),
        training_data=request.training_data,
        eval_data=request.eval_data,
        steps=options.steps,
        rank=options.rank,
        alpha=_decimal(options.alpha),
        learning_rate=_decimal(options.learning_rate),
        batch_size=options.batch_size,
        max_length=options.max_length,
        target_modules=options.target_modules,
        seed=options.seed if options.HasField("seed") else None,
        eval_fraction=_decimal(options.eval_fraction) if options.HasField("eval_fraction") else None,
        overwrite=request.overwrite,
    )


class TrainingService:
    """`loraserve.v1.Training` over the training manager (rights are checked there, per job)."""

    def __init__(self, training: TrainingManager) -> None:
        self.training = training

    async def CreateTrainingJob(self, request: pb2.CreateTrainingJobRequest, call: Call) -> pb2.TrainingJob:
        return training_job(await self.training.create(job_request(request), call.principal))

    async def GetTrainingJob(self, request: pb2.GetTrainingJobRequest, call: Call) -> pb2.TrainingJob:
        return training_job(self.training.get(request.job_id, call.principal))

    async def ListTrainingJobs(
        self, request: pb2.ListTrainingJobsRequest, call: Call
    ) -> pb2.ListTrainingJobsResponse:
        return pb2.ListTrainingJobsResponse(
            jobs=[training_job(r) for r in self.training.list(call.principal)]
        )

    async def CancelTrainingJob(self, request: pb2.CancelTrainingJobRequest, call: Call) -> pb2.TrainingJob:
        return training_job(self.training.cancel(request.job_id, call.principal))

    async def WatchTrainingJob(
        self, request: pb2.WatchTrainingJobRequest, call: Call
    ) -> AsyncIterator[pb2.TrainingJob]:
        async for record in self.training.watch(request.job_id, call.principal):
            yield training_job(record)


def grpc_services(services: Services) -> tuple[InferenceService, AdapterAdminService, TrainingService]:
    """The gRPC servicers over one set of services."""
    return (
        InferenceService(services.core),
        AdapterAdminService(services.admin),
        TrainingService(services.training),
    )
