"""Sequence classification: a transformers encoder with a classification head, accuracy and F1."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import AutoModelForSequenceClassification

from lightning_peft.core.adapter_control import adapter_names
from lightning_peft.core.adapter_files import class_names
from lightning_peft.core.per_row import check_routable, per_row_adapters
from lightning_peft.data.text_classification import is_int_label
from lightning_peft.tasks.base import TransformersTask

STAGES = ("val", "test")


class SequenceClassification(TransformersTask):
    """A LightningModule that fine-tunes a text classifier: a transformers encoder with a new classification head.

    Classifies texts into ``num_labels`` classes, or into the names in ``labels``. The tokenizer is
    loaded at once; the model (``AutoModelForSequenceClassification``, its head newly initialized,
    or the folder's own where it has one of ``num_labels`` classes, its classes put in ``labels``'
    order where its ``id2label`` names them) is built in ``configure_model``, so the PEFT callbacks
    change it at setup: give them ``modules_to_save=["classifier"]`` to train the head. Training
    minimizes cross-entropy and logs ``train_loss``; validation and test log accuracy and macro F1
    (``val_acc``, ``val_f1``, ``test_acc``, ``test_f1``); ``predict`` returns per text a dict with
    the most probable ``label``, its ``probability`` and every class's ``probabilities``. The
    optimizer is AdamW over the trainable parameters only. With `MultiTaskData`, each row is
    computed with the adapter named after its task, and validation and test log each task's metrics
    too (``test_acc_tweets``); each task's adapter keeps its own learning-rate schedule, counted in
    its own updates.

    Args:
        model: a built-in name (``"minilm-l6"``, all-MiniLM-L6-v2) or a transformers model folder.
        num_labels: number of classes, used when there are no label names (integer labels).
        labels: class names in id order; ``None`` takes them, when the model is built, from the
            data module's ``labels`` (its training labels, when they are strings). They travel
            with checkpoints and name the predictions.
        learning_rate: AdamW's peak learning rate, a finite number above zero.
        weight_decay: AdamW's weight decay, a finite number, at least zero.
        warmup_steps: optimizer steps of linear warmup from zero, an integer at least zero; the
            learning rate then decays linearly to zero at the last step.
        trust_remote_code: allow model and tokenizer code from the model folder (off: safe by default).
        optimizer: ``"adamw"`` (torch) or ``"adamw8bit"`` (bitsandbytes, 8-bit moment estimates).

    Raises:
        ValueError: when ``optimizer``, ``learning_rate``, ``weight_decay`` or ``warmup_steps`` is
            not an allowed value.
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
        from lightning_peft.data import TextClassificationData
        from lightning_peft.tasks import SequenceClassification

        lora = LoRA(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
        trainer = L.Trainer(max_steps=300, callbacks=[lora])
        trainer.fit(SequenceClassification("minilm-l6"), datamodule=TextClassificationData(source="movie-snippets"))
        ```
    """

    def __init__(self, model: str = "minilm-l6", num_labels: int = 2, labels: Sequence[str] | None = None,
                 learning_rate: float = 5e-4, weight_decay: float = 0.01, warmup_steps: int = 30,
                 trust_remote_code: bool = False, optimizer: str = "adamw") -> None:
        super().__init__(model, learning_rate, weight_decay, warmup_steps, trust_remote_code, optimizer)
        self.new_head: dict[str, bool] = {}  # the head's layers built at random, and which one is the class layer
        if self.tokenizer.pad_token is None:  # a decoder's tokenizer: batches pad with its end token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.save_hyperparameters()

    @property
    def labels(self) -> list[str] | None:
        return self.hparams.labels

    def build_model(self) -> nn.Module:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if self.labels is None and getattr(datamodule, "labels", None):
            self.hparams.labels = list(datamodule.labels)  # saved with checkpoints
        num_labels = len(self.labels) if self.labels else self.hparams.num_labels
        check_labels_fit(self.labels, num_labels, datamodule)
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_labels, average="micro"),
                                    "f1": MulticlassF1Score(num_labels, average="macro")})
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        tasks = list(getattr(datamodule, "task_names", None) or [])  # MultiTaskData: metrics per task too
        self.task_metrics = nn.ModuleDict({stage: nn.ModuleDict({
            task: metrics.clone(prefix=f"{stage}_", postfix=f"_{task}") for task in tasks}) for stage in STAGES})
        model, loading = AutoModelForSequenceClassification.from_pretrained(  # a head of another size is made anew
            self.model_path, num_labels=num_labels, trust_remote_code=self.trust_remote_code,
            ignore_mismatched_sizes=True, output_loading_info=True)
        self.new_head = new_head_modules(model, loading)
        put_classes_in_order(model, self.labels)
        if self.tokenizer.pad_token_id is not None:  # a decoder's classifier reads the last token before the pad
            model.config.pad_token_id = self.tokenizer.pad_token_id  # that batches are padded with
        return model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                tasks: Sequence[str] | None = None) -> torch.Tensor:
        """The logits; with ``tasks`` (one adapter name per row), each row computed with its own adapter."""
        if tasks is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        with per_row_adapters(self.model, tasks):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def on_fit_start(self) -> None:
        """Refuse, before any step, tasks of the data that no adapter is named after, and a new head that no method
        trains."""
        tasks = getattr(self.trainer.datamodule, "task_names", None) or []
        missing = [task for task in tasks if task not in adapter_names(self)]
        if missing:
            raise ValueError(f"task '{missing[0]}' has no adapter of its name: give the trainer a PEFT method with "
                             f"adapter_name='{missing[0]}' (adapters: {', '.join(adapter_names(self)) or 'none'})")
        if tasks:
            check_routable(self.model, tasks)  # each task's rows go to its adapter alone
        check_new_head_trains(self.model, self.new_head)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"], batch.get("task"))
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: MetricCollection, stage: str) -> None:
        tasks = batch.get("task")
        predicted = self(batch["input_ids"], batch["attention_mask"], tasks).argmax(-1)
        metrics.update(predicted, batch["labels"])
        self.log_dict(metrics, prog_bar=True)
        for task, task_metrics in self.task_metrics[stage].items():
            rows = [i for i, name in enumerate(tasks or []) if name == task]
            if rows:
                task_metrics.update(predicted[rows], batch["labels"][rows])
                if self.trainer.world_size == 1:  # several processes: at the epoch's end, alike on each
                    self.log_dict(task_metrics)

    def _log_task_metrics(self, stage: str) -> None:
        """With several processes, log each task's metrics where any process evaluated rows of it, then reset them.

        Every process takes the same decision (one sum over the processes), since the metrics sync
        when computed: a process that had none of a task's rows computes it too, or the others wait.
        (One process logs them at each step, as the overall metrics, so callbacks see them at once.)
        """
        task_metrics = self.task_metrics[stage]
        if not task_metrics or self.trainer.world_size == 1:
            return
        seen = torch.tensor([float(any(metric.update_called for metric in metrics.values()))
                             for metrics in task_metrics.values()], device=self.device)
        seen = self.trainer.strategy.reduce(seen, reduce_op="sum")
        for metrics, processes in zip(task_metrics.values(), seen.tolist(), strict=True):
            if processes > 0:
                with warnings.catch_warnings():  # a process without the task's rows: its states are zeros
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
                    self.log_dict(metrics.compute(), sync_dist=True)
            metrics.reset()

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        for task_metrics in self.task_metrics["val"].values():
            task_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_task_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_task_metrics("test")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict]:
        """Per text: the most probable ``label`` (a name, or an id without names), its ``probability``, and each
        class's ``probabilities``."""
        probabilities = self(batch["input_ids"], batch["attention_mask"]).float().softmax(-1)
        names = list(self.labels or class_names(self.model) or range(probabilities.shape[-1]))
        return [{"label": names[int(row.argmax())], "probability": float(row.max()),
                 "probabilities": dict(zip(names, row.tolist(), strict=True))} for row in probabilities]


WRAPPERS = re.compile(r"\.(?:base_layer|adapters\.[^.]+)(?=\.)")  # PEFT layers' and saved copies' name parts


def new_head_modules(model: nn.Module, loading: dict[str, Any]) -> dict[str, bool]:
    """The modules outside the model's body that its folder had no weights for (a head made anew, at random), each
    with whether it is the class layer: the last of them that is a linear layer of ``num_labels`` outputs."""
    body = model.base_model_prefix + "."
    made = [*loading["missing_keys"], *(key for key, *_ in loading["mismatched_keys"])]
    paths = {name.rsplit(".", 1)[0] for name in made if not name.startswith(body) and "." in name}
    order = [name for name, _ in model.named_modules() if name in paths]
    classes = [name for name in order if isinstance(layer := model.get_submodule(name), nn.Linear)
               and layer.out_features == model.config.num_labels][-1:]
    return {name: name in classes for name in order}


def check_new_head_trains(model: nn.Module, head: dict[str, bool]) -> None:
    """Refuse a head made anew whose class layer nothing trains (its bias alone does not): every class would be read
    through random weights. Another new layer left frozen (DistilBERT's ``pre_classifier``) is a warning."""
    trained = [WRAPPERS.sub("", name) for name, param in model.named_parameters() if param.requires_grad]

    def trains(path: str) -> bool:  # any of its tensors but its bias, or an adapter's on it
        return any(name.startswith(path + ".") and name != path + ".bias" for name in trained)

    frozen = [path for path, is_classes in head.items() if is_classes and not trains(path)]
    if frozen:
        top = sorted({path.split(".")[0] for path in frozen})
        raise ValueError(f"the classification head ({', '.join(frozen)}) is new, initialized at random (the model "
                         f"folder has no head of {model.config.num_labels} classes), and no method trains its "
                         f"weights: add {', '.join(map(repr, top))} to the PEFT method's modules_to_save, or train it "
                         f"with Selective(modules={top})")
    idle = [path for path, is_classes in head.items() if not is_classes and not trains(path)]
    if idle:
        warnings.warn(f"{', '.join(idle)}: new, initialized at random, and frozen, so the head reads its features "
                      f"through a random layer; add {', '.join(map(repr, sorted({p.split('.')[0] for p in idle})))} "
                      "to the PEFT method's modules_to_save to train it", stacklevel=2)


def put_classes_in_order(model: nn.Module, labels: Sequence[str] | None) -> None:
    """Permute a folder's own head into ``labels``' order where its ``id2label`` names the same classes otherwise.

    The data numbers classes in its own (sorted) order; a fine-tuned classifier's folder keeps its
    own (``{0: "POSITIVE", 1: "NEGATIVE"}``), so without this each id would mean the other class.
    The names are then written into the config, which saved and exported models carry.
    """
    if not labels:
        return
    config = model.config
    theirs = [str(config.id2label.get(i, "")).lower() for i in range(config.num_labels)]
    ours = [str(name).lower() for name in labels]
    if sorted(theirs) == sorted(ours) and theirs != ours:
        layer = _class_layer(model, len(labels))
        order = torch.tensor([theirs.index(name) for name in ours])
        with torch.no_grad():
            for tensor in (layer.weight, layer.bias):
                if tensor is not None:
                    tensor.copy_(tensor[order])
    elif not all(name.startswith("label_") for name in theirs) and theirs != ours:
        warnings.warn(f"the model folder's head names its classes {', '.join(config.id2label.values())}, not the "
                      f"data's ({', '.join(labels)}): its class ids are kept as they are", stacklevel=2)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}


def _class_layer(model: nn.Module, num_labels: int) -> nn.Linear:
    """The head's last linear layer, whose output rows are the classes."""
    layers = [layer for layer in model.modules() if isinstance(layer, nn.Linear) and layer.out_features == num_labels]
    if not layers:
        raise ValueError(f"{type(model).__name__} names its classes in another order than the data, and has no linear "
                         f"layer of {num_labels} outputs to put them in the data's order")
    return layers[-1]


def check_labels_fit(labels: Sequence[str] | None, num_labels: int, datamodule: Any) -> None:
    """Refuse data whose class ids would not mean what the model's outputs are named (or count) before any step.

    The data numbers string labels in its own (sorted) order; integer labels must lie below ``num_labels``.
    """
    if num_labels < 2:
        named = f" ({', '.join(map(repr, labels))})" if labels else ""
        raise ValueError(f"a classifier needs at least two classes, but this one has {num_labels}{named}: give "
                         f"training data with rows of each class{'' if labels else ', or num_labels'}")
    theirs = getattr(datamodule, "labels", None)
    if labels and theirs and list(labels) != list(theirs):
        raise ValueError(f"the task's labels ({', '.join(labels)}) differ from the data's ({', '.join(theirs)}), "
                         "which number the classes: give the task the data's labels in that order, or none")
    splits = getattr(datamodule, "splits", None)
    if theirs or not isinstance(splits, dict):
        return
    for split, rows in splits.items():
        for row in rows:
            label = row[1] if isinstance(row, tuple) and len(row) == 2 else None
            if is_int_label(label) and not 0 <= int(label) < num_labels:
                raise ValueError(f"{split} data has label {label}, but the model has num_labels={num_labels}: "
                                 f"integer labels run from 0 to {num_labels - 1}")
