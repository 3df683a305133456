"""Causal language modelling: a transformers decoder trained on next tokens, with perplexity, that generates text."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import Perplexity
from transformers import AutoModelForCausalLM

from lightning_peft.core.checks import check_positive_int
from lightning_peft.core.layer import PEFTModule
from lightning_peft.core.models import learned_positions
from lightning_peft.data.causal_lm import IGNORE_INDEX
from lightning_peft.tasks.base import TransformersTask
from lightning_peft.tasks.chunked_loss import (
    capturing_head_input,
    fp16_autocast,
    next_token_loss,
    plain_linear_head,
    positions_behind,
    restore_rng,
    rng_state,
)


class CausalLM(TransformersTask):
    """A LightningModule that fine-tunes a causal language model: next-token loss, perplexity, greedy generation.

    The tokenizer is loaded at once (given the end token as padding when it has none); the
    transformers model is built in ``configure_model``, so the PEFT callbacks change it at setup.
    Training logs ``train_loss`` (each micro-batch's token mean, plus a mixture-of-experts model's
    router loss as its own loss adds it; under gradient accumulation each micro-batch counts
    equally, as in Lightning); validation and test log ``val_loss``/``val_ppl`` and
    ``test_loss``/``test_ppl``: the cross-entropy alone, over the same tokens (each predicted from
    the one before, so a soft prompt's first prediction is not counted), summed in float32 over
    the whole split;
    ``predict`` returns each prompt's greedy continuation as text, without the prompt. The
    optimizer is AdamW over the trainable parameters only.

    Args:
        model: a built-in name (``"smollm2-135m"``, SmolLM2-135M-Instruct) or a transformers model
            folder.
        learning_rate: AdamW's peak learning rate, a finite number above zero.
        weight_decay: AdamW's weight decay, a finite number, at least zero.
        warmup_steps: optimizer steps of linear warmup from zero, an integer at least zero; the
            learning rate then decays linearly to zero at the last step.
        max_new_tokens: the most tokens generated per prompt in ``predict``, a positive integer;
            generation stops earlier at the model's end token or the tokenizer's (with which the
            data ends each trained row).
        trust_remote_code: allow model and tokenizer code from the model folder (off: safe by default).
        optimizer: ``"adamw"`` (torch) or ``"adamw8bit"`` (bitsandbytes, 8-bit moment estimates).
        chunked_loss: compute the training loss with the output projection, a few rows at a time, so
            the whole batch's fp32 logits never exist at once (same loss and gradients, a
            mixture-of-experts model's router loss included); it falls back to the model's own loss
            where the head is not a plain ``nn.Linear``, the model transforms its logits, or
            autocast computes in float16 (whose loss scaling comes after the gradient is made).

    Raises:
        ValueError: when ``optimizer``, ``learning_rate``, ``weight_decay``, ``warmup_steps`` or
            ``max_new_tokens`` is not an allowed value.
        FileNotFoundError: when ``model`` is neither a built-in name nor a folder with a
            ``config.json``.
        ImportError: when ``optimizer="adamw8bit"`` and bitsandbytes is not installed or fails to
            import.
        AssetError: when ``model`` is a built-in name whose package is not installed (a
            RuntimeError from ``lightning_peft.assets``; the message says what to install).

    Examples:
        ```python
        import lightning as L
        from lightning_peft import LoRA
        from lightning_peft.data import CausalLMData
        from lightning_peft.tasks import CausalLM

        trainer = L.Trainer(max_steps=100, callbacks=[LoRA(r=8, target_modules=["q_proj", "v_proj"])])
        trainer.fit(CausalLM("smollm2-135m", learning_rate=1e-3), datamodule=CausalLMData(source="austen"))
        ```
    """

    def __init__(self, model: str = "smollm2-135m", learning_rate: float = 2e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 20, max_new_tokens: int = 64, trust_remote_code: bool = False,
                 optimizer: str = "adamw", chunked_loss: bool = True) -> None:
        check_positive_int(type(self).__name__, "max_new_tokens", max_new_tokens)
        super().__init__(model=model, learning_rate=learning_rate, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, trust_remote_code=trust_remote_code, optimizer=optimizer)
        self.save_hyperparameters()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # batched generation pads prompts
        self.use_chunked_loss = chunked_loss  # turned off for good if the model proves to transform its logits
        self.val_metrics = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_metrics = Perplexity(ignore_index=IGNORE_INDEX)
        # the loss over all of a split's tokens (log of its perplexity), not a mean of batch means
        self.val_token_loss, self.test_token_loss = MeanMetric(), MeanMetric()

    def build_model(self) -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
        return model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        """The model's output: logits, and the mean next-token loss over labels that are not -100."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.chunked_loss(batch) if self.use_chunked_loss else None
        if loss is None:
            loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def chunked_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The model's mean next-token loss without full logits, or None where that would not be exact."""
        head = self.model.get_output_embeddings()
        device = batch["input_ids"].device
        if not plain_linear_head(head) or "labels" not in batch or fp16_autocast(device) or _packs_rows(self.model):
            return None  # packed rows: their logits are gathered back per row, the model's own loss
        rng = rng_state(device)
        with capturing_head_input(head) as captured:
            output = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        positions = positions_behind(output.logits, captured["placeholder"])
        if positions is None:
            warnings.warn(f"{type(self.model).__name__} transforms or copies its logits after the output projection: "
                          "training uses its own loss (chunked_loss is off)", stacklevel=2)
            self.use_chunked_loss = False
            restore_rng(device, rng)  # the plain step draws the dropout masks a run without this forward draws
            return None
        hidden, labels = captured["hidden"], batch["labels"]
        if hidden.shape[1] != labels.shape[1]:  # positions before the returned ones (virtual tokens): no loss
            labels = labels.new_full(hidden.shape[:2], IGNORE_INDEX).index_copy_(
                1, torch.arange(hidden.shape[1], device=labels.device)[positions], labels)
        return next_token_loss(hidden, head, labels) + self._router_loss(output)

    def _router_loss(self, output) -> torch.Tensor | float:
        """The load-balancing loss a mixture-of-experts model adds to its own loss (``output_router_logits``), or 0."""
        aux = getattr(output, "aux_loss", None)
        if aux is None:
            return 0.0
        return getattr(self.model, "router_aux_loss_coef", self.model.config.router_aux_loss_coef) * aux

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, perplexity: Perplexity,
                  token_loss: MeanMetric) -> None:
        """Log the loss and perplexity over the same tokens, each predicted from the one before, in float32."""
        logits = self(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]  # token t predicts token t + 1
        counted = (targets != IGNORE_INDEX).sum()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                                 reduction="sum") / counted.clamp(min=1)
        perplexity.update(logits, targets)
        token_loss.update(loss, weight=counted)  # the batch's mean, by its tokens
        self.log(f"{stage}_loss", token_loss, prog_bar=True)
        self.log(f"{stage}_ppl", perplexity, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_token_loss.reset()
        _sum_in_float32(self.val_metrics, self.val_token_loss)

    def on_test_epoch_start(self) -> None:
        _sum_in_float32(self.test_metrics, self.test_token_loss)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics, self.val_token_loss)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics, self.test_token_loss)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        """Greedy continuations of the (left-padded) prompts, decoded without the prompts."""
        table, length = learned_positions(self.model), batch["input_ids"].shape[1] + self.hparams.max_new_tokens
        if table is not None and length > table:
            raise ValueError(f"prompts of {batch['input_ids'].shape[1]} tokens and max_new_tokens "
                             f"{self.hparams.max_new_tokens} need {length} positions, but {type(self.model).__name__} "
                             f"has {table} learned positions: give shorter prompts or fewer max_new_tokens")
        generated = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        max_new_tokens=self.hparams.max_new_tokens, do_sample=False,
                                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._end_tokens())
        return self.tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def _end_tokens(self) -> list[int] | None:
        """The model's end tokens and the tokenizer's, with which `CausalLMData` ends each trained row."""
        ends = self.model.generation_config.eos_token_id
        ends = [] if ends is None else [ends] if isinstance(ends, int) else list(ends)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ends:
            ends.append(self.tokenizer.eos_token_id)
        return ends or None


def _packs_rows(model: nn.Module) -> bool:
    """Whether a part of ``model`` moves rows' tokens under `per_row_adapters` (soft prompts of several lengths)."""
    return any(part.packs_rows() for part in model.modules() if isinstance(part, PEFTModule))


def _sum_in_float32(*metrics: Metric) -> None:
    """Keep ``metrics``' sums in float32: ``bf16-true`` casts them with the model, and bf16 sums drift."""
    for metric in metrics:
        metric.set_dtype(torch.float32)
