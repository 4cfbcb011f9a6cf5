"""One training job's compute, in slices the engine interleaves with serving steps.

Runs on the engine's thread, through the served model's own modules: the base weights (NF4 or
otherwise) stay frozen and shared, the job's `TrainableLoRA` is added by each adapted layer
only inside this module's forward passes (their forward context carries it), and attention is
dense and causal over the padded batch (no KV cache). Serving steps never see the job's weights.

A slice is bounded work, so a serving step waits at most one slice:
- training: one micro-batch of at most `micro_batch_tokens` tokens, forward and backward; the
  optimizer steps after the last micro-batch of a batch (gradients accumulated, each micro
  batch's loss summed and divided by the batch's label tokens, so a step equals one pass over
  the whole batch);
- evaluation: one greedy token of one held-out example (a full forward; eval sets are small).
When both are done, `write` puts the adapter into the store atomically.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraserve.adapters.trainable import TrainableLoRA
from loraserve.adapters.training import (
    IGNORE,
    METADATA_FILE,
    learning_rate_schedule,
    normalise,
    padded_batches,
    publish_permissions,
)
from loraserve.engine.runner import decoder_parts
from loraserve.forward_context import ForwardContext, forward_context
from loraserve.training.spec import DEFAULTS, TrainingSpec

EVAL_MAX_NEW_TOKENS = DEFAULTS.eval_max_new_tokens  # `loraserve train`'s
log = logging.getLogger(__name__)


def _linear4bit() -> type | None:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: nothing is packed
        return None
    return Linear4bit


def make_base_trainable(model: torch.nn.Module) -> int:
    """Freezes the base and turns off bitsandbytes' packed CPU weights; returns how many layers
    changed layout (0: serving numerics are untouched).

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight on its first
    inference call into a layout (bf16 block scales) whose kernel has no backward pass:
    gradients through those layers would be silently wrong (seen: a job learning at a third of
    PEFT's pace). Training therefore unpacks them, keeping the packed weight and its state
    aside: `restore_inference_layout` puts those very objects back once no job is left (the
    packed kernel served the bench model 2.7x faster on such a CPU), so serving after a job is
    bit for bit what it was before. While a job trains, serving uses the unpacked weights:
    outputs may differ slightly from the packed kernel's then.
    """
    model.requires_grad_(False)  # only the job's A and B get gradients
    linear4bit = _linear4bit()
    if linear4bit is None:
        return 0
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    changed = 0
    for module in model.modules():
        if not isinstance(module, linear4bit) or hasattr(module, "_loraserve_packs"):
            continue  # not 4-bit, or already made trainable by an earlier job
        module._loraserve_packs = getattr(module, "support_avx512bf16_for_cpu", False)
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module._loraserve_packed = (module.weight.data, state)
            # The inverse rewrites the state it is given: it gets a copy, the original is kept.
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, copy.copy(state)
            )
            changed += 1
    if changed:
        log.info(
            "training: %d 4-bit layers unpacked from the CPU inference layout (it has no backward)", changed
        )
    return changed


def restore_inference_layout(model: torch.nn.Module) -> int:
    """Undoes `make_base_trainable`'s unpacking: the packed weights and states it kept go back,
    and bitsandbytes may pack again where it did before; returns how many layers changed."""
    linear4bit = _linear4bit()
    if linear4bit is None:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, linear4bit) or not hasattr(module, "_loraserve_packs"):
            continue
        packed = getattr(module, "_loraserve_packed", None)
        if packed is not None:
            module.weight.data, module.weight.quant_state = packed
            del module._loraserve_packed
            changed += 1
        module.support_avx512bf16_for_cpu = module._loraserve_packs
        del module._loraserve_packs
    return changed


def swap_into_place(staging: Path, target: Path) -> None:
    """Moves the folder `staging` to `target`, replacing any folder there: if the move fails,
    the old folder is put back, so a failed write never loses the adapter it was replacing.
    (Between the two renames the id is briefly absent; a request then gets NOT_FOUND.)"""
    retired = None
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=".retired-", dir=target.parent))
        os.rename(target, retired / "old")
    try:
        os.rename(staging, target)
    except BaseException:
        if retired is not None:
            os.rename(retired / "old", target)
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


class TrainingFailed(Exception):
    """The job cannot go on; the message is for the client."""


@dataclass
class Progress:
    """What a slice changed, for the job's record."""

    step: int
    loss: float  # mean loss of the last optimizer steps
    tokens: int  # tokens trained so far
    eval_exact_match: float | None = None


class TrainingRun:
    """A job's LoRA weights, optimizer and position in its training and evaluation."""

    def __init__(
        self,
        spec: TrainingSpec,
        model: torch.nn.Module,
        tokenizer: Any,
        shapes: dict[str, tuple[int, int]],
        device: torch.device,
        eos_ids: set[int],
        micro_batch_tokens: int,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.device = device
        self.eos_ids = eos_ids
        self.micro_batch_tokens = micro_batch_tokens
        self.parts = decoder_parts(model)
        self.layout_changed = make_base_trainable(model) > 0
        options = spec.options
        self.lora = TrainableLoRA(
            {name: shapes[name] for name in spec.modules}, options.rank, options.alpha, device, options.seed
        )
        self.params = self.lora.parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=options.learning_rate, weight_decay=0.0)
        self.schedule = learning_rate_schedule(self.optimizer, options.steps)
        batch_size = min(options.batch_size, len(spec.train))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batches = padded_batches(spec.train, batch_size, pad, random.Random(options.seed))
        self.step = 0
        self.tokens = 0
        self.losses: list[float] = []
        self._micro: list[tuple[torch.Tensor, ...]] = []  # the batch's micro-batches still to run
        self._batch_labels = 0
        self._batch_loss = 0.0
        self._eval_index = 0
        self._eval_tokens: list[int] = []
        self._hits = 0
        self.samples: list[dict[str, str]] = []
        self.eval_exact_match: float | None = None

    @classmethod
    def on_engine(cls, spec: TrainingSpec, engine: Any, micro_batch_tokens: int) -> TrainingRun:
        """A run on an engine's model (its served layers and adapter-slot shapes)."""
        loaded = engine.loaded
        return cls(
            spec,
            loaded.model,
            loaded.tokenizer,
            engine.slots.shapes,
            loaded.device,
            engine.eos_ids,
            micro_batch_tokens,
        )

    # ------------------------------------------------------------------ forward
    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: [B, T] -> last hidden states [B, T, H], with the job's LoRA added."""
        embed, rotary, layers, _, _ = self.parts
        batch, length = ids.shape
        positions = torch.arange(length, device=self.device)[None].expand(batch, length)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        attend = causal[None, None] & mask.bool()[:, None, None, :]  # [B, 1, T, T]
        with forward_context(ForwardContext(training=self.lora)):
            hidden = embed(ids)
            position_embeddings = rotary(hidden, positions)
            for layer in layers:
                out = layer(
                    hidden,
                    attention_mask=attend,
                    position_ids=positions,
                    position_embeddings=position_embeddings,
                )
                hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _loss_sum(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the label tokens (each predicted from the position before it);
        the output head runs only at those positions."""
        hidden = self._hidden(ids, mask)
        target = labels[:, 1:]
        keep = target != IGNORE
        _, _, _, norm, head = self.parts
        logits = head(norm(hidden[:, :-1][keep])).float()  # [N, vocab]
        return F.cross_entropy(logits, target[keep], reduction="sum")

    # ------------------------------------------------------------------ slices
    @property
    def training_done(self) -> bool:
        return self.step >= self.spec.options.steps

    @property
    def done(self) -> bool:
        return self.training_done and self._eval_index >= len(self.spec.evals)

    def run_slice(self) -> Progress:
        """One bounded piece of work: a training micro-batch, or one evaluation token."""
        if not self.training_done:
            self._train_slice()
        elif self._eval_index < len(self.spec.evals):
            self._eval_slice()
        return Progress(
            self.step,
            sum(self.losses[-10:]) / len(self.losses[-10:]) if self.losses else 0.0,
            self.tokens,
            eval_exact_match=self.eval_exact_match,
        )

    def _split(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        rows = max(1, self.micro_batch_tokens // ids.shape[1])
        self._micro = [
            (
                ids[i : i + rows].to(self.device),
                labels[i : i + rows].to(self.device),
                mask[i : i + rows].to(self.device),
            )
            for i in range(0, ids.shape[0], rows)
        ]
        self._batch_labels = int((labels[:, 1:] != IGNORE).sum())
        self._batch_loss = 0.0

    def _train_slice(self) -> None:
        if not self._micro:
            self._split(*next(self.batches))
        ids, labels, mask = self._micro.pop(0)
        with torch.enable_grad():
            loss_sum = self._loss_sum(ids, labels, mask)
            (loss_sum / self._batch_labels).backward()
        self._batch_loss += loss_sum.item()
        self.tokens += int(mask.sum())
        if self._micro:
            return
        loss = self._batch_loss / self._batch_labels
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if not math.isfinite(loss) or not torch.isfinite(norm):
            raise TrainingFailed(
                f"training diverged at step {self.step + 1}: the loss is {loss:g}; try a lower learning_rate"
            )
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(round(loss, 4))

    @torch.no_grad()
    def _eval_slice(self) -> None:
        prompt, expected = self.spec.evals[self._eval_index]
        ids = torch.tensor([prompt + self._eval_tokens], dtype=torch.long, device=self.device)
        hidden = self._hidden(ids, torch.ones_like(ids))
        _, _, _, norm, head = self.parts
        token = int(head(norm(hidden[0, -1:])).float().argmax(-1))
        self._eval_tokens.append(token)
        if token not in self.eos_ids and len(self._eval_tokens) < EVAL_MAX_NEW_TOKENS:
            return
        answer = self.tokenizer.decode(self._eval_tokens, skip_special_tokens=True)
        self._hits += normalise(answer) == normalise(expected)
        if len(self.samples) < 5:
            self.samples.append({"expected": expected, "got": answer.strip()})
        self._eval_index += 1
        self._eval_tokens = []
        if self._eval_index == len(self.spec.evals):
            self.eval_exact_match = self._hits / len(self.spec.evals)

    # ------------------------------------------------------------------ result
    def write(self, store: Path, base_model: str, seconds: float) -> Path:
        """Writes the adapter into the store atomically; a job that may not overwrite refuses an
        adapter that appeared meanwhile."""
        target = store / self.spec.adapter_id
        if target.exists() and not (target / "adapter_config.json").is_file():
            raise TrainingFailed(
                f"{self.spec.adapter_id!r} became a folder of adapters while the job trained"
            )
        if target.exists() and not self.spec.overwrite:
            raise TrainingFailed(
                f"adapter {self.spec.adapter_id!r} appeared in the store while the job trained; "
                "not overwritten (create the job with overwrite to replace it)"
            )
        config, tensors = self.lora.peft_files(base_model)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".training-", dir=target.parent))
        try:
            from safetensors.torch import save_file

            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
            save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
            metadata = json.dumps(self.metadata(base_model, seconds), indent=2, ensure_ascii=False)
            (staging / METADATA_FILE).write_text(metadata)
            publish_permissions(staging)
            swap_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def metadata(self, base_model: str, seconds: float) -> dict:
        options = self.spec.options
        return {
            "adapter_id": self.spec.adapter_id,
            "base_model": base_model,
            "trained_by": "loraserve Training service",
            "tenant": self.spec.tenant,
            "data_sha256": self.spec.data_sha256,
            "config": {
                **options.__dict__,
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in self.spec.modules}),
            },
            "steps": self.step,
            "tokens": self.tokens,
            "seconds": round(seconds, 2),
            "finished_unix_seconds": round(time.time(), 3),
            "loss_curve": self.losses,
            "eval": {
                "exact_match": self.eval_exact_match,
                "examples": len(self.spec.evals),
                "samples": self.samples,
            },
        }
