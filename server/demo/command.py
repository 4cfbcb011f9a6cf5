"""`loraserve demo`: builds the default demo's tenant adapters in the foreground (or, with
--toy, the from-scratch demo model and its adapters that the tests use) and prints the scores."""

from __future__ import annotations

import json
from typing import Any


def demo_cli(args: Any) -> int:
    if args.toy:
        from loraserve.demo.build import build_demo_cli

        return build_demo_cli(args)
    from loraserve.demo.tenants import build_tenants, describe_scores, tenants_build
    from loraserve.gguf import convert, packaged_model

    build = tenants_build(args.cache_dir)
    if args.force:
        import shutil

        shutil.rmtree(build.root, ignore_errors=True)
    if args.background:
        from loraserve.demo.background import in_background

        in_background()
    gguf_file = packaged_model()
    # The HF folder that the server converts on its first start (cached under the user cache).
    model_dir = convert(gguf_file, build.root.parent)
    report = build_tenants(build, str(gguf_file), mode="lines" if args.background or args.json else "bar")
    if args.background:
        return 0
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(gguf_file),
                    "adapters_dir": str(build.adapters_dir),
                    "data_dir": str(build.data_dir),
                }
                | report,
                ensure_ascii=False,
            )
        )
        return 0
    print(f"base model:  {gguf_file.stem} (NF4), converted once to {model_dir}")
    print(f"adapters:    {build.adapters_dir} ({', '.join(report['adapters'])})")
    print(f"data sets:   {build.data_dir}")
    for adapter_id, entry in report["adapters"].items():
        print(f"  {adapter_id:13s} {describe_scores(adapter_id, entry)}")
    return 0
