"""`loraserve`: the console script.

Server side: serve, demo, train, bench, keygen (torch imported only when they run; `train
--target HOST:PORT` trains on a server instead, through the client, and imports none).
Client side (loraserve_client.cli, no torch): generate, chat, adapters list|load|unload, health, info,
tokenize. Every `serve` flag comes from a ServerConfig field and is also an environment
variable LORASERVE_<NAME>. Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import functools
import sys
import types
import typing
from typing import Any

from loraserve.config import ServerConfig, load_config
from loraserve_client.cli import add_client_commands, quiet_on_broken_pipe, run


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _metavar(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _metavar(args[0])
    return {int: "N", float: "X", str: "TEXT"}.get(annotation, "VALUE")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field; unset flags fall back to LORASERVE_* env vars, then defaults."""
    for name, field in ServerConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (env LORASERVE_{name.upper()})"
        if _is_bool(field.annotation):
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, metavar=_metavar(field.annotation), help=help_text
            )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    given = {name: getattr(args, name) for name in ServerConfig.model_fields if hasattr(args, name)}
    return load_config(**given)


def cmd_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    import asyncio

    from loraserve.app import LoraServer
    from loraserve.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    return asyncio.run(LoraServer(config).run())


def cmd_serve_ray(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from loraserve.app import resolve_model
    from loraserve.logs import setup_logging
    from loraserve.ray_app import run_forever

    setup_logging(config.log_level, config.log_format)
    config = resolve_model(config)  # the demo is built once, here, not by every replica
    return run_forever(
        config, args.replicas, args.address, args.num_cpus_per_replica, args.num_gpus_per_replica
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    from loraserve.auth import key_entry_toml, new_key

    key = new_key()
    adapters = args.adapters or ["*"]
    base = (
        "may also call the base model (--no-base-model denies it)"
        if args.base_model
        else "may not call the base model"
    )
    print(
        f"# API key for tenant {args.tenant} (shown once; give it to the client):\n# {key}\n"
        f"# It may use adapters matching {', '.join(adapters)}, {base},\n"
        f"# and {'may' if args.admin else 'may not'} call AdapterAdmin. Add this entry to the keys file:\n",
        file=sys.stderr,
    )
    print(key_entry_toml(key, args.tenant, adapters, args.admin, args.name, base_model=args.base_model))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loraserve.demo.command import demo_cli

    return demo_cli(args)


def cmd_train(args: argparse.Namespace) -> int:
    if args.target is not None:  # a job on that server, followed from here (no torch imported)
        from loraserve_client.cli import cmd_train_remote

        return cmd_train_remote(args)
    from loraserve.adapters.training import train_cli

    return train_cli(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from loraserve.benchmarks.run import bench_cli

    return bench_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-tenant LoRA inference server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "serve", help="run the gRPC server", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_config_flags(p)
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser(
        "serve-ray",
        help="run replicas on Ray Serve, routed by adapter (same gRPC API)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=2, help="engine replicas (each loads the base model)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    add_config_flags(p)
    p.set_defaults(func=cmd_serve_ray)

    p = commands.add_parser("demo", help="train the default model's demo adapters now (cached)")
    from loraserve.demo.options import add_demo_flags

    add_demo_flags(p)
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser(
        "train", help="QLoRA-train one adapter into an adapter store, or on a server (--target)"
    )
    from loraserve.adapters.training_options import add_train_flags, check_train_args
    from loraserve_client.cli import add_train_target_flags

    add_train_flags(p)  # local training
    add_train_target_flags(p)  # --target and the client's connection flags
    p.set_defaults(func=cmd_train, check_args=functools.partial(check_train_args, p))

    p = commands.add_parser("bench", help="benchmark the engine against its peers")
    from loraserve.benchmarks.options import add_bench_flags

    add_bench_flags(p)
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("keygen", help="make an API key and print its [[keys]] entry")
    p.add_argument("--tenant", required=True)
    p.add_argument("--adapters", action="append", help="glob pattern of allowed adapter ids (repeatable)")
    p.add_argument(
        "--base-model",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="allow calls to the base model (empty adapter id), whatever --adapters says",
    )
    p.add_argument("--admin", action="store_true", help="allow AdapterAdmin calls")
    p.add_argument("--name", default="")
    p.set_defaults(func=cmd_keygen)

    add_client_commands(commands)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, after each command's own checks (`check_args`: exit 2 as argparse)."""
    args = build_parser().parse_args(argv)
    check = getattr(args, "check_args", None)
    if check is not None:
        check(args)
    return args


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.command not in ("serve", "serve-ray"):  # they configure logging from their config
        from loraserve.logs import setup_logging

        setup_logging("warning")
    return run(args)  # ConfigError is a ValueError: one line naming the option, exit 2


def main(argv: list[str] | None = None) -> int:
    return quiet_on_broken_pipe(lambda: _main(argv))  # `loraserve ... | head` stops silently


if __name__ == "__main__":
    sys.exit(main())
