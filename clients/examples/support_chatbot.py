"""A support chatbot in the terminal: the `support-bot` adapter answers questions about loraserve.

python clients/examples/support_chatbot.py --target 127.0.0.1:50051
> How do I load an adapter?
"""

from __future__ import annotations

import argparse
import sys

from loraserve_client import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    args = parser.parse_args()
    with Client(args.target) as client:
        for line in sys.stdin:
            question = line.strip()
            if not question:
                continue
            # Each question stands alone: the adapter was trained on single-turn conversations.
            for chunk in client.chat_stream([("user", question)], "support-bot", max_new_tokens=64):
                print(chunk.text, end="", flush=True)
            print()


if __name__ == "__main__":
    main()
