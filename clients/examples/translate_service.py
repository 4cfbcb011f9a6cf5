"""A tiny translation service on top of loraserve: Portuguese -> English with the `pt-en` adapter.

python clients/examples/translate_service.py --target 127.0.0.1:50051 "o gato preto" "as casas velhas"
"""

from __future__ import annotations

import argparse

from loraserve_client import Client


def translate(client: Client, phrases: list[str], adapter: str = "pt-en") -> list[str]:
    """One chat turn per phrase; the adapter was trained to answer with the translation only."""
    return [client.chat([("user", phrase)], adapter, max_new_tokens=24).text.strip() for phrase in phrases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phrases", nargs="+")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--adapter", default="pt-en", help="pt-en or en-pt")
    args = parser.parse_args()
    with Client(args.target) as client:
        for phrase, english in zip(args.phrases, translate(client, args.phrases, args.adapter)):
            print(f"{phrase} -> {english}")


if __name__ == "__main__":
    main()
