"""The CLI's client commands: generate, chat, adapters list|load|unload, health, info, tokenize.

They import no torch, so they start fast. Errors print one line (`loraserve: NOT_FOUND: ...`)
and exit non-zero; `--json` prints machine-readable output for scripts. When the reader of
stdout goes away (`loraserve adapters list | head -1`), a command stops silently with status
141, as a Unix tool killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from loraserve_client.base import DEFAULT_TARGET
from loraserve_client.client import Client
from loraserve_client.types import AdapterInfo, TrainingJob

CHAT_HELP = "Commands: /adapter ID (switch adapter; empty = base model), /reset, /history, /exit"


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("LORASERVE_TARGET", DEFAULT_TARGET),
        help=f"server address host:port (default {DEFAULT_TARGET}; env LORASERVE_TARGET)",
    )
    add_credential_flags(group)
    group.add_argument(
        "--ray-serve",
        action="store_true",
        help="target is a Ray Serve gRPC proxy: route by adapter (multiplexed model id)",
    )
    group.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_credential_flags(
    group: argparse._ActionsContainer, timeout_help: str = "per-call timeout in seconds"
) -> None:
    """How to reach the server once its address is known: API key, TLS, timeout."""
    group.add_argument(
        "--api-key",
        default=os.environ.get("LORASERVE_API_KEY"),
        help="API key sent as `authorization: Bearer` (env LORASERVE_API_KEY)",
    )
    group.add_argument(
        "--tls", action="store_true", help="connect with TLS (system CA roots unless --ca-cert)"
    )
    group.add_argument("--ca-cert", help="PEM CA certificate that signed the server's certificate")
    group.add_argument("--client-cert", help="PEM client certificate (mTLS)")
    group.add_argument("--client-key", help="PEM private key of --client-cert")
    group.add_argument("--server-name", help="expected name in the server certificate")
    group.add_argument("--timeout", type=float, default=300.0, help=timeout_help)


def make_client(args: argparse.Namespace, **options: Any) -> Client:
    return Client(
        args.target,
        **options,
        api_key=args.api_key,
        tls=args.tls,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        server_name=args.server_name,
        timeout=args.timeout,
        ray_serve=getattr(args, "ray_serve", False),  # `loraserve train --target` has no --ray-serve
    )


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", "-a", default="", help="adapter id (default: the base model)")
    parser.add_argument(
        "--max-new-tokens", "-n", type=int, default=0, help="most tokens to generate (0: server default)"
    )
    parser.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
    }


def _stream_to_stdout(chunks: Any) -> tuple[str, Any]:
    parts, last = [], None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        parts.append(chunk.text)
        last = chunk
    sys.stdout.write("\n")
    return "".join(parts), last


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with make_client(args) as client:
        if args.json or args.no_stream:
            result = client.generate(prompt, args.adapter, **generation_kwargs(args))
            if args.json:
                print(json.dumps(asdict(result)))
            else:
                print(result.text)
            return 0
        _stream_to_stdout(client.generate_stream(prompt, args.adapter, **generation_kwargs(args)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A REPL keeping the conversation; each answer streams as it comes."""
    adapter = args.adapter
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty() and not args.json
    if interactive:
        print(f"chatting with {adapter or 'the base model'} at {args.target}. {CHAT_HELP}", file=sys.stderr)
    with make_client(args) as client:
        while True:
            if interactive:
                sys.stderr.write(f"[{adapter or 'base'}] > ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                return 0
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command == "/exit":
                    return 0
                if command == "/adapter":
                    adapter = rest.strip()
                    if args.json:
                        print(json.dumps({"adapter": adapter}))
                    else:
                        print(f"(now using {adapter or 'the base model'})", file=sys.stderr)
                elif command == "/reset":
                    history = history[:1] if args.system else []
                elif command == "/history":
                    print(json.dumps(history, indent=2), file=sys.stderr)
                else:
                    print(f"unknown command {command}. {CHAT_HELP}", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            if args.json:
                result = client.chat(history, adapter, **generation_kwargs(args))
                answer = result.text
                print(json.dumps({"adapter": adapter, **asdict(result)}))
            else:
                answer, _ = _stream_to_stdout(client.chat_stream(history, adapter, **generation_kwargs(args)))
            history.append({"role": "assistant", "content": answer})


def _table(rows: list[AdapterInfo]) -> str:
    header = ("ADAPTER", "STATE", "RANK", "TARGETS", "MiB", "IN-FLIGHT", "PINNED", "LAST USED")
    lines = [header]
    for a in rows:
        state = a.state + (" (draining)" if a.draining else "")
        used = (
            time.strftime("%H:%M:%S", time.localtime(a.last_used_unix_seconds))
            if a.last_used_unix_seconds
            else "-"
        )
        lines.append(
            (
                a.adapter_id,
                state,
                str(a.rank or "-"),
                ",".join(a.target_modules) or "-",
                f"{a.bytes / 2**20:.2f}" if a.bytes else "-",
                str(a.in_flight_requests),
                "yes" if a.pinned else "",
                used,
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def cmd_adapters(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        if args.action == "list":
            rows = client.list_adapters(include_disk=args.all)
            print(json.dumps([asdict(a) for a in rows]) if args.json else _table(rows))
        elif args.action == "load":
            result = client.load_adapter(args.adapter_id, pin=args.pin)
            if args.json:
                print(json.dumps(asdict(result)))
            else:
                verb = "reloaded" if result.reloaded else "loaded"
                pinned = ", pinned" if result.adapter.pinned else ""
                print(
                    f"{verb} {args.adapter_id} in {result.load_seconds * 1e3:.1f} ms "
                    f"(slot {result.adapter.slot}, rank {result.adapter.rank}{pinned})"
                )
        else:
            info = client.unload_adapter(args.adapter_id)
            if args.json:
                print(json.dumps(asdict(info)))
            elif info.draining:
                print(
                    f"unloading {args.adapter_id}: "
                    f"{info.in_flight_requests} requests still in flight will finish"
                )
            else:
                print(f"unloaded {args.adapter_id}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with make_client(args, retries=0) as client:  # a health probe reports what it sees, at once
        state = client.health(timeout=min(args.timeout, 10.0))
    print(json.dumps({"status": state}) if args.json else state)
    return 0 if state == "SERVING" else 1


def cmd_info(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        info = client.model_info()
    if args.json:
        print(json.dumps(asdict(info)))
    else:
        for key, value in asdict(info).items():
            print(f"{key}: {value}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        result = client.tokenize(args.text)
    print(
        json.dumps(asdict(result))
        if args.json
        else " ".join(f"{t}({i})" for t, i in zip(result.tokens, result.token_ids))
    )
    return 0


def add_train_target_flags(parser: argparse.ArgumentParser) -> None:
    """`loraserve train`'s flags for training on a server (the server's CLI adds them)."""
    group = parser.add_argument_group("training on a server")
    group.add_argument(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="submit the job to the loraserve server at HOST:PORT and follow it with a progress bar "
        "instead of training here (--model and --adapters-dir are then refused); "
        "LORASERVE_TARGET is not read, so that a plain `loraserve train` always trains here",
    )
    add_credential_flags(group, timeout_help="timeout of each call in seconds (watching the job has none)")


def _job_seconds(job: TrainingJob) -> float:
    if not job.started_unix_seconds:
        return 0.0
    end = job.finished_unix_seconds or time.time()
    return max(0.0, end - job.started_unix_seconds)


def train_summary(job: TrainingJob) -> str:
    """The last line of `loraserve train --target`: adapter, state, steps, seconds, held-out score."""
    score = (
        f"{job.eval_exact_match:.1%} of {job.eval_examples}"
        if job.eval_exact_match is not None
        else "not evaluated"
    )
    return (
        f"{job.adapter_id}: {job.state}, {job.step}/{job.total_steps} steps in {_job_seconds(job):.1f} s, "
        f"loss {job.loss:.3f}, held-out exact match {score} (job {job.job_id})"
    )


def _follow(client: Client, job: TrainingJob, quiet: bool) -> TrainingJob:
    """Watches the job to its end with a tqdm bar on stderr (steps, loss); returns its last state."""
    try:
        from tqdm import tqdm
    except ImportError:  # the client-only install has no tqdm: no bar then
        tqdm, quiet = None, True
    bar = None
    if not quiet:
        bar = tqdm(total=job.total_steps or None, desc=f"train {job.adapter_id}", unit="step")
    last, running = job, False
    try:
        for last in client.watch_training_job(job.job_id):
            if bar is not None:
                if not running and last.state != "queued":  # time and rate from the start, not the queue
                    running = True
                    bar.reset(total=last.total_steps or None)
                elif last.total_steps and bar.total != last.total_steps:
                    bar.total = last.total_steps
                if last.step > bar.n:
                    bar.update(last.step - bar.n)
                bar.set_postfix_str(f"loss {last.loss:.3f}" if last.step else last.state)
            if last.done:
                break
    finally:
        if bar is not None:
            bar.close()
    return last


def cmd_train_remote(args: argparse.Namespace) -> int:
    """`loraserve train --target HOST:PORT`: CreateTrainingJob, then WatchTrainingJob to the end.

    Exits 0 when the job succeeded, 1 when it failed or was cancelled (the reason on stderr),
    130 on Ctrl-C, which stops watching but leaves the job running on the server.
    """
    from loraserve_client.errors import LoraserveError

    with make_client(args) as client:
        try:
            job = client.create_training_job(
                args.adapter_id,
                args.data,
                eval_data=args.eval_data,
                steps=args.steps or 0,
                rank=args.rank or 0,
                alpha=args.alpha or 0.0,
                learning_rate=args.lr or 0.0,
                batch_size=args.batch_size or 0,
                max_length=args.max_length or 0,
                target_modules=args.target_modules or "",
                seed=args.seed,
                eval_fraction=args.eval_fraction,
                overwrite=args.force,
            )
        except KeyboardInterrupt:
            print(
                f"loraserve: interrupted before {args.target} answered; the job may have been queued",
                file=sys.stderr,
            )
            return 130
        if not args.quiet:
            print(
                f"queued training job {job.job_id} for adapter {job.adapter_id} on {args.target}",
                file=sys.stderr,
            )
        try:
            job = _follow(client, job, args.quiet)
            if not job.done:  # the server closed the watch early (shutting down, say)
                job = client.get_training_job(job.job_id)
        except KeyboardInterrupt:
            print(
                f"loraserve: interrupted; training job {job.job_id} ({job.adapter_id}) keeps running on "
                f"{args.target}. Follow it with loraserve_client.Client({args.target!r})"
                f".watch_training_job({job.job_id!r}), stop it with .cancel_training_job({job.job_id!r})",
                file=sys.stderr,
            )
            return 130
        except LoraserveError as error:
            print(f"loraserve: lost track of training job {job.job_id}: {error}", file=sys.stderr)
            return 1
    print(train_summary(job))
    if job.state == "succeeded":
        return 0
    if not job.done:
        print(
            f"loraserve: the server stopped reporting on training job {job.job_id} while it was {job.state}",
            file=sys.stderr,
        )
    elif job.state == "failed":
        reason = job.error or "no reason given"
        print(f"loraserve: training job {job.job_id} failed: {reason}", file=sys.stderr)
    else:
        reason = f": {job.error}" if job.error else ""
        print(f"loraserve: training job {job.job_id} was {job.state}{reason}", file=sys.stderr)
    return 1


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="generate text (streams to the terminal)")
    p.add_argument("prompt", help="prompt text, or - to read it from stdin")
    add_generation_flags(p)
    p.add_argument("--no-stream", action="store_true", help="print the whole answer at the end")
    add_connection_flags(p)
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("chat", help="interactive chat REPL (/adapter ID switches tenant)")
    add_generation_flags(p)
    p.add_argument("--system", default="", help="system message at the start of the conversation")
    add_connection_flags(p)
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("adapters", help="list, load or unload adapters")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("list", help="adapters in memory (and on disk with --all)")
    q.add_argument("--all", action="store_true", help="also list adapters only on disk in the store")
    add_connection_flags(q)
    q = actions.add_parser("load", help="load (or reload) an adapter onto the device")
    q.add_argument("adapter_id")
    q.add_argument("--pin", action="store_true", help="never evict it from its device slot")
    add_connection_flags(q)
    q = actions.add_parser("unload", help="retire an adapter (in-flight requests finish first)")
    q.add_argument("adapter_id")
    add_connection_flags(q)
    p.set_defaults(func=cmd_adapters)

    p = commands.add_parser("health", help="exit 0 when the server is SERVING")
    add_connection_flags(p)
    p.set_defaults(func=cmd_health)

    p = commands.add_parser("info", help="the served model and the server's limits")
    add_connection_flags(p)
    p.set_defaults(func=cmd_info)

    p = commands.add_parser("tokenize", help="show how the server tokenizes a text")
    p.add_argument("text")
    add_connection_flags(p)
    p.set_defaults(func=cmd_tokenize)


# What a shell reports for a process killed by SIGPIPE (128 + signal number).
BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


def _broken_pipe() -> int:
    """stdout's reader is gone: stop quietly. Python ignores SIGPIPE, so the write raised
    BrokenPipeError instead of killing the process as it kills `cat`; restoring SIGPIPE's
    default action instead would also apply to the server's sockets. stdout now points at
    /dev/null so that the interpreter's last flush at exit cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_STATUS


def quiet_on_broken_pipe(body: Callable[[], int]) -> int:
    """Runs a console script's body (argument parsing included: `--help | head`)."""
    try:
        return body()
    except BrokenPipeError:
        return _broken_pipe()


def run(args: argparse.Namespace) -> int:
    """Runs a parsed command: errors are one line on stderr and a non-zero exit, never a traceback."""
    from loraserve_client.errors import LoraserveError

    try:
        return args.func(args)
    except BrokenPipeError:  # before OSError: a closed pipe is no error to report
        return _broken_pipe()
    except LoraserveError as error:
        print(f"loraserve: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # config errors (ValueError) included
        print(f"loraserve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - one line, never a traceback
        print(f"loraserve: unexpected error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """`loraserve-client`: the client commands alone (the client-only distribution's script)."""
    parser = argparse.ArgumentParser(prog="loraserve-client", description="Client of a loraserve server.")
    add_client_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return quiet_on_broken_pipe(lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
