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
from loraserve_client.types import AdapterInfo

CHAT_HELP = "Commands: /adapter ID (switch adapter; empty = base model), /reset, /history, /exit"


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("LORASERVE_TARGET", DEFAULT_TARGET),
        help=f"server address host:port (default {DEFAULT_TARGET}; env LORASERVE_TARGET)",
    )
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
    group.add_argument("--timeout", type=float, default=300.0, help="per-call timeout in seconds")
    group.add_argument(
        "--ray-serve",
        action="store_true",
        help="target is a Ray Serve gRPC proxy: route by adapter (multiplexed model id)",
    )
    group.add_argument("--json", action="store_true", help="print JSON for scripts")


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
        ray_serve=args.ray_serve,
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
