"""Trains the demo's small Llama base model from scratch on the synthetic corpus (CPU, seeded)."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from loraserve.adapters.training import optimize, padded_batches
from loraserve.toy import build_llama


def pretrain(
    out_dir: Path,
    corpus: list[str],
    tokenizer: Any,
    model_shape: dict[str, int],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains a LlamaForCausalLM on the corpus lines (each BOS ... EOS) and saves it with its tokenizer."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = build_llama(vocab_size=len(tokenizer), seed=seed, tokenizer=tokenizer, **model_shape)
    model.train()
    lines = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in corpus]
    batches = padded_batches(
        [(ids, ids) for ids in lines], batch_size, tokenizer.pad_token_id, random.Random(seed)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    started = time.perf_counter()
    with tqdm(total=steps, disable=not progress, desc="pretrain base", unit="step") as bar:
        losses = optimize(
            model, list(model.parameters()), batches, optimizer, schedule, steps, bar, "cpu", window=20
        )
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "loss_curve": losses[::10],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
    }
