"""`loraserve demo`: builds the demo base model and three tenants' adapters, cached and seeded.

1. A byte-level BPE tokenizer and a small Llama model trained from scratch on the synthetic
   corpus (both languages, separately, plus loraserve's documentation).
2. Three adapters trained with `loraserve train` (QLoRA on the NF4 base): `pt-en`, `en-pt`
   and `support-bot`, from generated JSONL data sets written next to them.
3. Held-out exact match of each adapter and of the base model on the same tasks.

The build goes to a staging folder and is renamed into place when complete, under a lock,
so concurrent callers (make serve, tests) build it once. Its files get the usual modes (umask),
so a container running as another user can read a mounted build.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraserve.demo import corpus as data
from loraserve.demo.options import default_cache_dir
from loraserve.paths import BuildFolder

DEMO_VERSION = 3
SEED = 0
TOKENIZER_VOCAB = 1024
BASE_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
PRETRAIN_STEPS = 1800
# Per adapter: (steps, learning rate). Translation needs more push to learn agreement (en-pt).
RECIPES = {"pt-en": (1600, 4e-3), "en-pt": (2400, 3e-3), "support-bot": (1200, 3e-3)}
ADAPTER_EXAMPLES = 400  # training examples per adapter
EVAL_EXAMPLES = 48  # held-out examples per adapter
ADAPTERS = ("pt-en", "en-pt", "support-bot")


@dataclass(frozen=True)
class DemoBuild(BuildFolder):
    """The from-scratch toy demo: its base model beside the adapters and data."""

    @property
    def model_dir(self) -> Path:
        return self.root / "base"

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.root / "demo.json").read_text())


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_datasets(folder: Path) -> dict[str, tuple[Path, Path]]:
    """JSONL training and held-out sets of the three adapters; returns id -> (train, eval)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_phrases, test_phrases = data.translation_split(SEED)
    en_train, en_test = data.translation_split(SEED + 1)
    qa_train, qa_test = data.support_split(SEED)
    sets = {
        "pt-en": (
            [_chat(p.portuguese, p.english) for p in train_phrases[:ADAPTER_EXAMPLES]],
            [_chat(p.portuguese, p.english) for p in test_phrases[:EVAL_EXAMPLES]],
        ),
        "en-pt": (
            [_chat(p.english, p.portuguese) for p in en_train[:ADAPTER_EXAMPLES]],
            [_chat(p.english, p.portuguese) for p in en_test[:EVAL_EXAMPLES]],
        ),
        "support-bot": (
            [_chat(q.question, q.answer) for q in qa_train[:ADAPTER_EXAMPLES]],
            [_chat(q.question, q.answer) for q in qa_test[:EVAL_EXAMPLES]],
        ),
    }
    paths = {}
    for adapter_id, (train_rows, eval_rows) in sets.items():
        pair = (folder / f"{adapter_id}.train.jsonl", folder / f"{adapter_id}.eval.jsonl")
        for path, rows in zip(pair, (train_rows, eval_rows)):
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths[adapter_id] = pair
    return paths


def pretraining_lines() -> list[str]:
    """The base model's corpus: both languages and the docs, plus copy lines (`x ; x`) that
    teach attention to look back, which the adapters then bend into translation."""
    import random

    lines = data.pretraining_corpus(SEED)
    for phrase in data.all_phrases():
        lines += [f"{phrase.portuguese} ; {phrase.portuguese}", f"{phrase.english} ; {phrase.english}"]
    random.Random(SEED).shuffle(lines)
    return lines


def build(root: Path, progress: bool = True) -> dict[str, Any]:
    """Builds everything into `root` (which must not exist) and returns the report."""
    import torch

    from loraserve.adapters.training import TrainConfig, exact_match, read_jsonl, train
    from loraserve.demo.pretrain import pretrain
    from loraserve.model_loader import load_base_model
    from loraserve.toy import build_tokenizer

    started = time.perf_counter()
    torch.manual_seed(SEED)
    lines = pretraining_lines()
    tokenizer = build_tokenizer(lines, TOKENIZER_VOCAB)
    base_stats = pretrain(
        root / "base", lines, tokenizer, BASE_SHAPE, PRETRAIN_STEPS, seed=SEED, progress=progress
    )
    datasets = write_datasets(root / "data")
    report: dict[str, Any] = {"version": DEMO_VERSION, "base": base_stats, "adapters": {}}
    for adapter_id, (train_path, eval_path) in datasets.items():
        # A pristine NF4 base for each adapter: training leaves hooks and flags on the model.
        loaded = load_base_model(str(root / "base"), "nf4", "cpu", "float32")
        steps, lr = RECIPES[adapter_id]
        config = TrainConfig(
            model=str(root / "base"),
            data=train_path,
            eval_data=eval_path,
            adapters_dir=root / "adapters",
            adapter_id=adapter_id,
            rank=16,
            alpha=32,
            lr=lr,
            steps=steps,
            batch_size=16,
            seed=SEED,
            eval_max_new_tokens=32,
            quiet=not progress,
        )
        result = train(config, base_model=loaded.model, tokenizer=loaded.tokenizer)
        base_score, _ = exact_match(loaded.model, loaded.tokenizer, read_jsonl(eval_path), 32)
        report["adapters"][adapter_id] = {
            "exact_match": result.eval_exact_match,
            "base_exact_match": base_score,
            "eval_examples": result.eval_examples,
            "train_seconds": round(result.seconds, 1),
            "final_loss": sum(result.losses[-20:]) / 20,
            "samples": result.samples[:3],
        }
    report["seconds"] = round(time.perf_counter() - started, 1)
    (root / "demo.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def ensure_demo(cache_dir: Path | None = None, force: bool = False, progress: bool = True) -> DemoBuild:
    """The cached demo build, building it first if missing (or if `force`)."""
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    demo = DemoBuild(cache_dir / f"demo-v{DEMO_VERSION}")
    with open(cache_dir / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force and demo.root.exists():
            shutil.rmtree(demo.root)
        if not (demo.root / "demo.json").is_file():
            staging = cache_dir / f".demo-v{DEMO_VERSION}.building"
            shutil.rmtree(staging, ignore_errors=True)
            build(staging, progress)
            from loraserve.adapters.training import publish_permissions  # imports torch: not at the top

            publish_permissions(staging)  # readable by other users (a container's), as umask allows
            shutil.rmtree(demo.root, ignore_errors=True)
            staging.rename(demo.root)
    return demo


def print_report(demo: DemoBuild) -> None:
    report = demo.report
    print(f"demo model:   {demo.model_dir}")
    print(f"adapters:     {demo.adapters_dir} ({', '.join(report['adapters'])})")
    print(f"data sets:    {demo.data_dir}")
    print(f"built in {report['seconds']:.0f} s; held-out exact match (adapter vs base model):")
    for adapter_id, scores in report["adapters"].items():
        print(
            f"  {adapter_id:12s} {scores['exact_match']:6.1%}  vs  {scores['base_exact_match']:5.1%}"
            f"  ({scores['eval_examples']} examples)"
        )


def build_demo_cli(args: Any) -> int:
    demo = ensure_demo(args.cache_dir, args.force, progress=not args.json)
    if args.json:
        print(
            json.dumps(
                {
                    "model_dir": str(demo.model_dir),
                    "adapters_dir": str(demo.adapters_dir),
                    "data_dir": str(demo.data_dir),
                    **demo.report,
                },
                ensure_ascii=False,
            )
        )
    else:
        print_report(demo)
    return 0
