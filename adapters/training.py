"""`loraserve train`: QLoRA fine-tuning of one adapter, written as a standard PEFT folder.

The base model is loaded quantized (NF4 by default) with bitsandbytes; PEFT puts LoRA on the
chosen modules; a plain AdamW loop trains on a JSONL data set of `{"prompt", "completion"}`
or chat `{"messages": [...]}` records, with the loss on the completion / assistant turns only.
A held-out split is scored by exact match of greedy generations. The result goes into the
adapter store (adapter_config.json + adapter_model.safetensors + loraserve_training.json),
moved into place atomically so a running server never sees half an adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraserve.errors import InvalidArgument
from loraserve.ids import validate_adapter_id

log = logging.getLogger(__name__)
METADATA_FILE = "loraserve_training.json"
IGNORE = -100


class DataError(ValueError):
    """A training record is wrong; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One record: either prompt/completion or a conversation."""

    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class TrainConfig:
    model: str
    data: Path
    adapters_dir: Path
    adapter_id: str
    eval_data: Path | None = None
    eval_fraction: float = 0.1
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    target_modules: str = "all-linear"
    lr: float = 2e-3
    epochs: float = 3.0
    steps: int = 0
    batch_size: int = 16
    max_length: int = 256
    seed: int = 0
    quantization: str = "nf4"
    eval_max_new_tokens: int = 48
    quiet: bool = False
    force: bool = False


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    eval_exact_match: float | None = None
    eval_examples: int = 0
    samples: list[dict[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[Example]:
    """Parses and checks every line; errors name the line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    return parse_jsonl(text, str(path))


def parse_jsonl(text: str, source: str) -> list[Example]:
    """The records of a JSONL text; errors name `source` and the line number."""
    examples = []
    # JSONL lines end at "\n" only: str.splitlines would also split inside strings holding
    # U+2028, U+0085 or a form feed, which JSON allows unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        except (RecursionError, ValueError) as error:  # nesting too deep, an integer too long
            raise DataError(f"{where}: not valid JSON ({type(error).__name__}: {str(error)[:100]})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        examples.append(_parse_record(record, where, number))
    if not examples:
        raise DataError(f"{source}: the data set is empty")
    return examples


def _parse_record(record: dict, where: str, number: int) -> Example:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        turns = []
        for i, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise DataError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
            if message["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}].role must be system, user or assistant")
            turns.append((message["role"], message["content"]))
        if turns[-1][0] != "assistant":
            raise DataError(f"{where}: the last message must be from the assistant (what the model learns)")
        return Example(number, messages=tuple(turns))
    for name in ("prompt", "completion"):
        if name not in record:
            raise DataError(f"{where}: missing field '{name}' (or give 'messages')")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field '{name}' must be a string")
    if not record["completion"]:
        raise DataError(f"{where}: field 'completion' is empty")
    return Example(number, prompt=record["prompt"], completion=record["completion"])


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)


def encode(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels IGNORE outside the completion / assistant turns."""
    if not example.is_chat:
        prompt = tokenizer(example.prompt)["input_ids"]
        completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    else:
        messages = [{"role": r, "content": c} for r, c in example.messages]
        ids = _chat_ids(tokenizer, messages, generation_prompt=False)
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(_chat_ids(tokenizer, messages[:i], generation_prompt=True))
            end = len(_chat_ids(tokenizer, messages[: i + 1], generation_prompt=False))
            labels[start:end] = ids[start:end]
    return ids[:max_length], labels[:max_length]


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    held = max(1, int(len(shuffled) * fraction)) if len(shuffled) > 1 and fraction > 0 else 0
    return shuffled[held:], shuffled[:held]


def eval_prompt(tokenizer: Any, example: Example) -> tuple[list[int], str]:
    """Prompt ids and the expected answer of a held-out example."""
    if not example.is_chat:
        return tokenizer(example.prompt)["input_ids"], example.completion
    messages = [{"role": r, "content": c} for r, c in example.messages[:-1]]
    return _chat_ids(tokenizer, messages, generation_prompt=True), example.messages[-1][1]


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


@torch.inference_mode()
def exact_match(
    model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int, samples: int = 5
) -> tuple[float, list[dict[str, str]]]:
    """Share of examples whose greedy answer equals the expected one (case/space-insensitive)."""
    model.eval()
    hits, shown = 0, []
    for example in examples:
        ids, expected = eval_prompt(tokenizer, example)
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        hits += normalise(answer) == normalise(expected)
        if len(shown) < samples:
            shown.append({"expected": expected, "got": answer.strip()})
    return (hits / len(examples) if examples else 0.0), shown


# ---------------------------------------------------------------------------------- training
def padded_batches(
    encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random
):
    """Endless shuffled batches of (ids, labels, mask), right-padded (labels IGNORE on padding)."""
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            chunk = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (x, y) in enumerate(chunk):
                ids[row, : len(x)] = torch.tensor(x)
                labels[row, : len(y)] = torch.tensor(y)
                mask[row, : len(x)] = 1
            yield ids, labels, mask


def optimize(
    model: Any,
    params: list,
    batches: Any,
    optimizer: Any,
    schedule: Any,
    steps: int,
    bar: Any,
    device: Any,
    window: int = 10,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """The optimisation loop shared by adapter training and the demo's pretraining: one step per
    batch (clipped at norm 1), the progress bar showing the mean loss of the last `window`;
    `on_step(steps done, loss)` after each step (the demo's background trainer reports progress)."""
    losses: list[float] = []
    for _ in range(steps):
        ids, labels, mask = (t.to(device) for t in next(batches))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{sum(losses[-window:]) / len(losses[-window:]):.3f}")
        bar.update()
        if on_step is not None:
            on_step(len(losses), losses[-1])
    return losses


def learning_rate_schedule(optimizer: Any, steps: int) -> Any:
    """Linear warm-up over the first 5% of the steps, then linear decay to 5% of the rate."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps)
    )


def _target_modules(spec: str) -> list[str] | str:
    return "all-linear" if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def data_hash(*paths: Path | None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def train(
    config: TrainConfig,
    base_model: Any = None,
    tokenizer: Any = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Trains one adapter and writes it into the store. `base_model` may be passed pre-loaded;
    `on_step(steps done, loss)` is called after each optimizer step."""
    try:
        validate_adapter_id(config.adapter_id)
    except InvalidArgument as error:
        raise DataError(f"--adapter-id: {error.message}") from None
    target = Path(config.adapters_dir) / config.adapter_id
    if target.exists() and not config.force:
        raise DataError(f"--adapter-id: {target} already exists (use --force to overwrite)")
    examples = read_jsonl(config.data)
    if config.eval_data is not None:
        train_set, eval_set = examples, read_jsonl(config.eval_data)
    else:
        train_set, eval_set = split(examples, config.eval_fraction, config.seed)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from tqdm import tqdm

    from loraserve.model_loader import load_base_model

    torch.manual_seed(config.seed)
    started = time.perf_counter()
    if base_model is None:
        loaded = load_base_model(config.model, config.quantization, "auto", "float32", True)
        base_model, tokenizer = loaded.model, loaded.tokenizer
    base_model.requires_grad_(False)
    if config.quantization != "none":
        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        use_rslora=config.rslora,
        target_modules=_target_modules(config.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    model = get_peft_model(base_model, lora)
    encoded = [encode(tokenizer, e, config.max_length) for e in train_set]
    encoded = [pair for pair in encoded if any(label != IGNORE for label in pair[1])]
    if not encoded:
        raise DataError(
            f"{config.data}: no example has completion tokens within --max-length {config.max_length}"
        )
    batch_size = min(config.batch_size, len(encoded))
    steps = config.steps or max(1, math.ceil(config.epochs * len(encoded) / batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = learning_rate_schedule(optimizer, steps)
    device = next(p.device for p in model.parameters())
    batches = padded_batches(encoded, batch_size, tokenizer.pad_token_id, random.Random(config.seed))
    model.train()
    with tqdm(total=steps, disable=config.quiet, desc=f"train {config.adapter_id}", unit="step") as bar:
        losses = optimize(model, params, batches, optimizer, schedule, steps, bar, device, on_step=on_step)
    score, samples = exact_match(model, tokenizer, eval_set, config.eval_max_new_tokens)
    seconds = time.perf_counter() - started
    result = TrainResult(target, steps, seconds, losses, score if eval_set else None, len(eval_set), samples)
    _save(model, config, result, target)
    model.unload()  # leave the base model as it was (callers may train several adapters on it)
    return result


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def publish_permissions(root: Path) -> None:
    """Gives a tree written through private files the permissions of files created normally:
    folders 0777 and files 0666, less the umask (0755 / 0644 with the usual 022).

    The staging folder comes from tempfile.mkdtemp (0700) and safetensors writes its files 0600,
    so without this an adapter or a demo model made on the host is unreadable to every other
    user, such as the Docker image's non-root user reading a mounted store. Called before the
    tree is renamed into place, so readers never see the private modes.
    """
    mask = current_umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _save(model: Any, config: TrainConfig, result: TrainResult, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".training-", dir=target.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        metadata = {
            "adapter_id": config.adapter_id,
            "base_model": config.model,
            "data": str(config.data),
            "data_sha256": data_hash(config.data, config.eval_data),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "steps": result.steps,
            "seconds": round(result.seconds, 2),
            "loss_curve": result.losses,
            "eval": {
                "exact_match": result.eval_exact_match,
                "examples": result.eval_examples,
                "samples": result.samples,
            },
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
        (staging / "README.md").unlink(missing_ok=True)
        publish_permissions(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_cli(args: Any) -> int:
    config = TrainConfig(
        **{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)}
    )
    try:
        result = train(config)
    except DataError as error:
        raise ValueError(str(error)) from None
    first = sum(result.losses[:10]) / min(10, len(result.losses))
    last = sum(result.losses[-10:]) / min(10, len(result.losses))
    print(
        f"trained {config.adapter_id}: {result.steps} steps in {result.seconds:.1f} s, "
        f"loss {first:.3f} -> {last:.3f}"
    )
    if result.eval_exact_match is not None:
        print(f"held-out exact match: {result.eval_exact_match:.1%} of {result.eval_examples}")
    print(f"wrote {result.adapter_dir}")
    return 0
