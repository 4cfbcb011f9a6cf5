"""The training side of the client and `loraserve train --target`: TrainingJob from a real
protobuf message, the CreateTrainingJob request, `train`'s argument checks, the client and the
command against a real server on the toy model, and, where a failure must be injected (which
calls gRPC's retry policy replays, a watch that ends early, Ctrl-C), a scripted servicer."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from loraserve.adapters.training import TrainConfig
from loraserve.adapters.training_options import LOCAL_DEFAULTS
from loraserve.cli import parse_args
from loraserve_client import AsyncClient, Client, InvalidRequest, TrainingJob, Unavailable
from loraserve_client.api import loraserve_pb2 as pb2
from loraserve_client.api import loraserve_pb2_grpc as pb2_grpc
from loraserve_client.base import MAX_MESSAGE_BYTES, training_job_request
from loraserve_client.cli import run, train_summary
from tests.helpers import ServerThread

ROW = {"prompt": "copy cat:", "completion": " cat"}
DATA = (json.dumps(ROW) + "\n") * 4


def _job(**fields) -> pb2.TrainingJob:
    base = {"job_id": "job-1", "adapter_id": "team/cat", "tenant": "t", "created_unix_seconds": 100.0}
    return pb2.TrainingJob(**{**base, **fields})


# ---------------------------------------------------------------------------- TrainingJob


def test_training_job_from_a_protobuf_message() -> None:
    message = _job(
        state=pb2.TRAINING_STATE_SUCCEEDED,
        step=40,
        total_steps=40,
        loss=0.25,
        eval_exact_match=0.75,
        started_unix_seconds=110.0,
        finished_unix_seconds=170.5,
        eval_examples=8,
        train_examples=72,
    )
    job = TrainingJob.from_pb(pb2.TrainingJob.FromString(message.SerializeToString()))
    assert job == TrainingJob(
        job_id="job-1",
        adapter_id="team/cat",
        state="succeeded",
        step=40,
        total_steps=40,
        loss=0.25,
        eval_exact_match=0.75,
        error="",
        created_unix_seconds=100.0,
        started_unix_seconds=110.0,
        finished_unix_seconds=170.5,
        tenant="t",
        eval_examples=8,
        train_examples=72,
    )
    assert job.done
    with pytest.raises(AttributeError):
        job.state = "running"  # frozen
    assert "team/cat: succeeded, 40/40 steps in 60.5 s, loss 0.250, held-out exact match 75.0% of 8" in (
        train_summary(job)
    )


def test_unevaluated_exact_match_is_none_not_zero() -> None:
    assert TrainingJob.from_pb(_job(state=pb2.TRAINING_STATE_RUNNING)).eval_exact_match is None
    assert TrainingJob.from_pb(_job(eval_exact_match=0.0)).eval_exact_match == 0.0
    job = TrainingJob.from_pb(_job(state=pb2.TRAINING_STATE_FAILED, error="out of memory"))
    assert job.error == "out of memory" and "not evaluated" in train_summary(job)


@pytest.mark.parametrize(
    ("state", "name", "done"),
    [
        (pb2.TRAINING_STATE_UNSPECIFIED, "unknown", False),
        (pb2.TRAINING_STATE_QUEUED, "queued", False),
        (pb2.TRAINING_STATE_RUNNING, "running", False),
        (pb2.TRAINING_STATE_SUCCEEDED, "succeeded", True),
        (pb2.TRAINING_STATE_FAILED, "failed", True),
        (pb2.TRAINING_STATE_CANCELLED, "cancelled", True),
    ],
)
def test_training_states_are_lowercase_names(state: int, name: str, done: bool) -> None:
    job = TrainingJob.from_pb(_job(state=state))
    assert (job.state, job.done) == (name, done)


# ---------------------------------------------------------------------------- the request


def test_unset_options_are_zero_so_the_server_applies_its_defaults() -> None:
    request = training_job_request("cat", DATA.encode())
    assert request.training_data == DATA.encode() and request.eval_data == b""
    assert request.options == pb2.TrainingOptions() and not request.overwrite
    assert not request.options.HasField("seed") and not request.options.HasField("eval_fraction")
    request = training_job_request(
        "cat",
        DATA,
        steps=5,
        rank=4,
        alpha=8.0,
        learning_rate=1e-3,
        batch_size=2,
        max_length=64,
        target_modules="q_proj,v_proj",
        seed=0,
        eval_fraction=0.0,
        overwrite=True,
    )
    options = request.options
    assert (options.steps, options.rank, options.batch_size, options.max_length) == (5, 4, 2, 64)
    assert options.alpha == 8.0 and options.learning_rate == pytest.approx(1e-3)
    assert options.target_modules == "q_proj,v_proj" and request.overwrite
    # 0 is a seed and a share like any other: set, not "unset".
    assert options.HasField("seed") and options.seed == 0
    assert options.HasField("eval_fraction") and options.eval_fraction == 0.0


def test_data_as_bytes_jsonl_text_or_a_path(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(DATA)
    for value in (DATA.encode(), DATA, path, str(path)):
        request = training_job_request("cat", value, eval_data=value)
        assert request.training_data == request.eval_data == DATA.encode()
    assert training_job_request("cat", "\n " + DATA).training_data == ("\n " + DATA).encode()
    with pytest.raises(FileNotFoundError):
        training_job_request("cat", tmp_path / "missing.jsonl")


def test_data_over_grpcs_message_limit_is_refused_here() -> None:
    with pytest.raises(ValueError, match="at most 16 MiB"):
        training_job_request("cat", b"x" * (MAX_MESSAGE_BYTES - 10), eval_data=b"y" * 100)


# ---------------------------------------------------------------------------- `loraserve train` flags


def _usage_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


TRAIN = ["train", "--data", "d.jsonl", "--adapter-id", "cat"]


def test_local_training_requires_model_and_adapters_dir(capsys) -> None:
    err = _usage_error(capsys, TRAIN)
    assert "required: --model, --adapters-dir (or --target HOST:PORT" in err
    assert err.startswith("usage: loraserve train")
    err = _usage_error(capsys, [*TRAIN, "--model", "m"])
    assert "required: --adapters-dir (or --target" in err


def test_local_training_sees_the_defaults_it_always_had() -> None:
    args = parse_args([*TRAIN, "--model", "m", "--adapters-dir", "store"])
    assert args.target is None
    fields = TrainConfig.__dataclass_fields__
    for name, field in fields.items():
        if name not in ("model", "data", "adapters_dir", "adapter_id", "eval_data"):
            assert getattr(args, name) == field.default, name
    assert set(LOCAL_DEFAULTS) <= set(fields)
    args = parse_args(
        [*TRAIN, "--model", "m", "--adapters-dir", "s", "-r", "4", "--epochs", "2", "--seed", "7"]
    )
    assert (args.rank, args.epochs, args.seed, args.alpha) == (4, 2.0, 7, 16.0)


def test_with_target_model_and_store_are_not_required_and_unset_options_stay_unset() -> None:
    args = parse_args([*TRAIN, "--target", "host:1", "--api-key", "k", "--tls"])
    assert (args.target, args.api_key, args.tls) == ("host:1", "k", True)
    assert args.model is None and args.adapters_dir is None
    assert all(getattr(args, name) is None for name in LOCAL_DEFAULTS)
    args = parse_args([*TRAIN, "--target", "host:1", "--epochs", "3", "--quantization", "nf4"])
    assert args.epochs == 3.0  # the default: the server's 3 epochs, nothing to refuse


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (["--epochs", "2"], "--epochs is for local training"),
        (["--model", "m"], "--model is for local training"),
        (["--adapters-dir", "s"], "--adapters-dir is for local training"),
        (["--quantization", "int8"], "--quantization is for local training"),
        (["--rslora"], "--rslora is for local training"),
        (["--dropout", "0.1"], "--dropout is for local training"),
        (["--eval-max-new-tokens", "8"], "--eval-max-new-tokens is for local training"),
    ],
)
def test_with_target_local_only_flags_are_refused(capsys, flags: list[str], refused: str) -> None:
    assert refused in _usage_error(capsys, [*TRAIN, "--target", "host:1", *flags])


def test_an_empty_target_is_an_error_not_local_training(capsys) -> None:
    assert "--target: give the server's address" in _usage_error(capsys, [*TRAIN, "--target", " "])


# ---------------------------------------------------------------------------- against a scripted server


class ScriptedTraining(pb2_grpc.TrainingServicer):
    """Answers from a script; the first `fail[method]` attempts of a method fail with UNAVAILABLE."""

    def __init__(self, watch: list[pb2.TrainingJob], fail: dict[str, int] | None = None) -> None:
        self.watch, self.fail = watch, fail or {}
        self.attempts: Counter[str] = Counter()
        self.requests: list[pb2.CreateTrainingJobRequest] = []
        self.lock = threading.Lock()

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.attempts[method] += 1
            attempt = self.attempts[method]
        if attempt <= self.fail.get(method, 0):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted failure of {method}")

    def CreateTrainingJob(self, request, context):
        self._attempt("create", context)
        if not request.training_data:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "training_data: the data set is empty")
        self.requests.append(request)
        return _job(adapter_id=request.adapter_id, state=pb2.TRAINING_STATE_QUEUED)

    def GetTrainingJob(self, request, context):
        self._attempt("get", context)
        return self.watch[-1]

    def ListTrainingJobs(self, request, context):
        self._attempt("list", context)
        return pb2.ListTrainingJobsResponse(jobs=[self.watch[-1], _job(job_id="job-0")])

    def CancelTrainingJob(self, request, context):
        self._attempt("cancel", context)
        return _job(job_id=request.job_id, state=pb2.TRAINING_STATE_CANCELLED)

    def WatchTrainingJob(self, request, context):
        self._attempt("watch", context)
        yield from self.watch


def _progress(last: pb2.TrainingJob) -> list[pb2.TrainingJob]:
    running = {"state": pb2.TRAINING_STATE_RUNNING, "total_steps": 4, "started_unix_seconds": 110.0}
    return [
        _job(state=pb2.TRAINING_STATE_QUEUED),
        _job(**running),
        _job(**running, step=2, loss=1.5),
        _job(**running, step=4, loss=0.5),
        last,
    ]


SUCCEEDED = _job(
    state=pb2.TRAINING_STATE_SUCCEEDED,
    step=4,
    total_steps=4,
    loss=0.5,
    eval_exact_match=0.75,
    eval_examples=4,
    train_examples=36,
    started_unix_seconds=110.0,
    finished_unix_seconds=122.0,
)
FAILED = _job(
    state=pb2.TRAINING_STATE_FAILED,
    step=2,
    total_steps=4,
    loss=1.5,
    error="loss is NaN",
    started_unix_seconds=110.0,
    finished_unix_seconds=111.0,
)


@pytest.fixture
def scripted(grpc_server):
    def start(watch: list[pb2.TrainingJob], fail: dict[str, int] | None = None):
        servicer = ScriptedTraining(watch, fail)
        return grpc_server(pb2_grpc.add_TrainingServicer_to_server, servicer), servicer

    return start


@pytest.fixture(scope="module")
def real(toy, tmp_path_factory):
    """A loraserve server on the toy model with a private copy of the store (jobs write into it)."""
    store = tmp_path_factory.mktemp("training-client") / "store"
    shutil.copytree(toy.store, store)
    with ServerThread(model=str(toy.base), adapters_dir=store, kv_cache_bytes=2 << 20) as srv:
        yield srv


def test_sync_client_training_methods(real) -> None:
    with Client(real.target) as client:
        job = client.create_training_job("team/sync", DATA, steps=4, seed=3)
        assert (job.adapter_id, job.state, job.done, job.total_steps) == ("team/sync", "queued", False, 4)
        updates = list(client.watch_training_job(job.job_id))
        assert updates[-1].state == "succeeded" and updates[-1].step == 4, updates[-1].error
        assert {u.state for u in updates[:-1]} <= {"queued", "running"}
        assert client.get_training_job(job.job_id) == updates[-1]
        assert job.job_id in [j.job_id for j in client.list_training_jobs()]
        assert client.cancel_training_job(job.job_id).state == "succeeded"  # already ended
        with pytest.raises(InvalidRequest, match="training_data is empty"):
            client.create_training_job("team/sync2", b"")


def test_async_client_training_methods(real) -> None:
    async def main() -> None:
        async with AsyncClient(real.target) as client:
            job = await client.create_training_job("team/async", DATA.encode(), steps=3, rank=4)
            assert job.state == "queued"
            states = [u.state async for u in client.watch_training_job(job.job_id)]
            assert states[-1] == "succeeded"
            assert (await client.get_training_job(job.job_id)).done
            assert job.job_id in [j.job_id for j in await client.list_training_jobs()]

    asyncio.run(main())


def test_creating_and_cancelling_are_never_retried_reading_is(scripted) -> None:
    target, servicer = scripted(_progress(SUCCEEDED), fail={"create": 1, "cancel": 1, "get": 2, "watch": 1})
    with Client(target, retries=3, backoff=0.01, max_backoff=0.05) as client:
        with pytest.raises(Unavailable, match="create"):
            client.create_training_job("team/cat", DATA)
        with pytest.raises(Unavailable, match="cancel"):
            client.cancel_training_job("job-1")
        assert client.get_training_job("job-1").state == "succeeded"
        assert list(client.watch_training_job("job-1"))[-1].done
    assert servicer.attempts == Counter({"create": 1, "cancel": 1, "get": 3, "watch": 2})


def test_async_client_does_not_retry_creation_either(scripted) -> None:
    target, servicer = scripted(_progress(SUCCEEDED), fail={"create": 1, "list": 1})

    async def main() -> None:
        async with AsyncClient(target, retries=3, backoff=0.01) as client:
            with pytest.raises(Unavailable):
                await client.create_training_job("team/cat", DATA)
            assert len(await client.list_training_jobs()) == 2

    asyncio.run(main())
    assert servicer.attempts == Counter({"create": 1, "list": 2})


def _train(target: str, tmp_path: Path, *flags: str) -> int:
    data = tmp_path / "train.jsonl"
    data.write_text(DATA)
    return run(
        parse_args(["train", "--target", target, "--data", str(data), "--adapter-id", "team/cat", *flags])
    )


def test_train_target_follows_the_job_and_exits_0_when_it_succeeds(real, tmp_path, capsys) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(DATA)
    argv = ["train", "--target", real.target, "--data", str(data), "--adapter-id", "team/cli"]
    assert run(parse_args([*argv, "--lr", "0.001", "--steps", "4", "--eval-fraction", "0"])) == 0
    out, err = capsys.readouterr()
    assert out.startswith("team/cli: succeeded, 4/4 steps in ")
    assert "for adapter team/cli on " + real.target in err
    assert "4/4" in err  # tqdm's bar, on stderr
    with Client(real.target) as client:
        assert "team/cli" in [a.adapter_id for a in client.list_adapters()]  # served at once
    # A second run refuses the id it already wrote, unless --force
    assert run(parse_args([*argv, "--steps", "2"])) == 1
    assert "ALREADY_EXISTS: adapter 'team/cli' already exists" in capsys.readouterr().err
    assert run(parse_args([*argv, "--steps", "2", "--force", "--quiet"])) == 0


def test_train_target_exits_1_with_the_reason_when_the_job_fails(toy, tmp_path, capsys) -> None:
    store = tmp_path / "store"
    shutil.copytree(toy.store, store)
    with ServerThread(
        model=str(toy.base), adapters_dir=store, kv_cache_bytes=2 << 20, training_max_seconds=0.2
    ) as srv:
        data = tmp_path / "train.jsonl"
        data.write_text(DATA)
        argv = ["train", "--target", srv.target, "--data", str(data), "--adapter-id", "team/slow"]
        assert run(parse_args([*argv, "--steps", "100000", "--quiet"])) == 1
    out, err = capsys.readouterr()
    assert out.startswith("team/slow: failed, ")
    assert err.startswith("loraserve: training job job-") and "training time limit of 0.2 s" in err


def test_train_target_refused_data_is_one_line(real, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(DATA + '{"prompt": "x"}\n')
    code = run(parse_args(["train", "--target", real.target, "--data", str(bad), "--adapter-id", "x"]))
    assert code == 1
    assert capsys.readouterr().err == (
        "loraserve: INVALID_ARGUMENT: training_data:5: missing field 'completion' (or give 'messages')\n"
    )


def test_ctrl_c_while_watching_leaves_the_job_running(scripted, tmp_path, capsys, monkeypatch) -> None:
    target, servicer = scripted(_progress(SUCCEEDED))

    def interrupted(self, job_id, *, timeout=None):
        yield TrainingJob.from_pb(_job(state=pb2.TRAINING_STATE_RUNNING, total_steps=4))
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "watch_training_job", interrupted)
    assert _train(target, tmp_path) == 130
    err = capsys.readouterr().err
    assert f"training job job-1 (team/cat) keeps running on {target}" in err
    assert ".cancel_training_job('job-1')" in err
    assert servicer.attempts["cancel"] == 0


def test_a_watch_that_ends_early_is_checked_once_more(scripted, tmp_path, capsys) -> None:
    running = _job(state=pb2.TRAINING_STATE_RUNNING, step=1, total_steps=4, started_unix_seconds=time.time())
    target, servicer = scripted([running])  # the stream closes while the job runs
    assert _train(target, tmp_path, "--quiet") == 1
    assert "stopped reporting on training job job-1 while it was running" in capsys.readouterr().err
    assert servicer.attempts["get"] == 1


def test_train_target_imports_no_torch(real, tmp_path) -> None:
    from tests.clients.test_cli import cli

    data = tmp_path / "train.jsonl"
    data.write_text(DATA)
    argv = [
        "train",
        "--target",
        real.target,
        "--data",
        str(data),
        "--adapter-id",
        "team/light",
        "--steps",
        "2",
    ]
    done = cli(*argv, blocked=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("team/light: succeeded, 2/2 steps")
