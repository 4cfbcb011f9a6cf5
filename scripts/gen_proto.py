"""Regenerate the Python gRPC stubs of proto/loraserve/v1/loraserve.proto into clients/api/.

Usage: python scripts/gen_proto.py [--out DIR]

The stubs are checked in (tests/test_proto_stubs.py fails when they are stale). protoc writes
`from loraserve.v1 import loraserve_pb2`; we rewrite that import to the package the stubs live
in, `loraserve_client.api` (clients/api/), so that both the server and the torch-free client import them.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "loraserve/v1/loraserve.proto"
OUT_PACKAGE = "loraserve_client.api"
GENERATED = ("loraserve_pb2.py", "loraserve_pb2.pyi", "loraserve_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) and writes the three stub files into out_dir."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + PROTO_FILE)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "loraserve" / "v1" / name).read_text()
            text = re.sub(r"^from loraserve\.v1 import", f"from {OUT_PACKAGE} import", text, flags=re.M)
            # The module name protoc records for the message classes (pickling finds them by it).
            text = text.replace("'loraserve.v1.loraserve_pb2'", f"'{OUT_PACKAGE}.loraserve_pb2'")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "clients" / "api")
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
