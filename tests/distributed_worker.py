"""Two-process runs of test_distributed.py, in one launch: DDP/FSDP2 fits, resumes, DoRA, two tasks, an unused adapter.

Run as ``python distributed_worker.py OUT_DIR``; Lightning starts the second process itself. Every
rank writes its adapter (full tensors) after each fit, so the test compares ranks and runs.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_peft import LoRA, PrefixTuning, PromptTuning  # noqa: E402
from lightning_peft.data import MultiTaskData, TextClassificationData  # noqa: E402
from lightning_peft.lightning.sharding import full_adapter_state_dict  # noqa: E402
from lightning_peft.tasks import SequenceClassification  # noqa: E402

from conftest import TokenModule, tiny_bert_folder, tiny_llama, token_loader  # noqa: E402

EPOCHS = 2  # of 8 sequences in global batches of 4 (2 per rank): 4 steps
SEQUENCES = 8
PER_RANK_BATCH = 2


def lora(**kwargs) -> LoRA:
    return LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], **kwargs)


SOFT_PROMPTS = {"prompt": lambda: PromptTuning(num_virtual_tokens=3),
                "prefix": lambda: PrefixTuning(num_virtual_tokens=3, projection_dim=8)}


class SeededLlama(TokenModule):
    """A tiny Llama built in ``configure_model`` from a fixed seed: the same base and adapter init everywhere."""

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(0)
            with torch.device("cpu"):  # the CPU generator, on whichever device the strategy would build
                self.model = tiny_llama()


class WithUnusedHead(SeededLlama):
    """A LoRA-adapted head that the loss never uses."""

    def configure_model(self) -> None:
        super().configure_model()
        self.unused_head = nn.Linear(32, 4)


class SaveAdapterPerRank(L.Callback):
    """After fit, every rank writes its adapter as ``{dirpath}/{name}_rank{global_rank}.pt``."""

    def __init__(self, dirpath: str, name: str = "adapter") -> None:
        self.dirpath, self.name = Path(dirpath), name

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = full_adapter_state_dict(pl_module)  # every rank gathers
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.dirpath / f"{self.name}_rank{trainer.global_rank}.pt")


def trainer(strategy: Strategy | str, callbacks: list[L.Callback], **kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=2, strategy=strategy, max_epochs=EPOCHS, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(callbacks=callbacks, **{**settings, **kwargs})


def loader() -> torch.utils.data.DataLoader:
    return token_loader(n=SEQUENCES, batch=PER_RANK_BATCH)


def fit_save_resume(name: str, strategy_factory: Callable[[], Strategy | str], out: Path) -> None:
    """Fit two epochs; fit one epoch and save a checkpoint; resume from it for the second epoch."""
    folder = out / name
    trainer(strategy_factory(), [lora(), SaveAdapterPerRank(folder)]).fit(SeededLlama(), loader())
    first_epoch = trainer(strategy_factory(), [lora()], max_epochs=1)
    first_epoch.fit(SeededLlama(), loader())
    first_epoch.save_checkpoint(folder / "epoch1.ckpt")
    trainer(strategy_factory(), [lora(), SaveAdapterPerRank(folder, "resumed")]).fit(
        SeededLlama(), loader(), ckpt_path=folder / "epoch1.ckpt")


def unused_adapter_fails_first(out: Path) -> None:
    """DDP with a LoRA layer outside the loss: record the error every rank raises."""
    run = trainer("ddp", [LoRA(r=4, target_modules=["q_proj", "unused_head"])])
    try:
        run.fit(WithUnusedHead(), loader())
    except RuntimeError as error:
        (out / f"unused_rank{run.global_rank}.txt").write_text(f"step {run.global_step}: {error}")


WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "very"]
TASKS = {"upbeat": 48, "gloomy": 32}  # rows: 6 and 4 batches of 8, so 3 and 2 steps on two processes
UNEVEN = 15  # rows of the evaluation file: two processes cannot take as many each


def write_tasks(folder: Path) -> dict[str, dict]:
    """A tiny BERT in ``folder/bert`` and each task's training csv, every row one of a kind (a word, then filler
    words by row), gloomy's labels flipped; returns the tasks' `MultiTaskData` settings."""
    tiny_bert_folder(folder / "bert", WORDS)
    for task, count in TASKS.items():
        filler = "the" if task == "upbeat" else "very"
        rows = [(" ".join([filler] * (i // 6) + ["movie", "was", WORDS[i % 6]]),
                 "positive" if (i % 6 < 3) == (task == "upbeat") else "negative") for i in range(count)]
        (folder / f"{task}.csv").write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    header_and_rows = (folder / "upbeat.csv").read_text().splitlines(keepends=True)[:UNEVEN + 1]
    (folder / "uneven.csv").write_text("".join(header_and_rows))
    for task, count in zip(TASKS, (1, 2), strict=True):  # 3 validation rows: one process sees none of upbeat's
        lines = (folder / f"{task}.csv").read_text().splitlines(keepends=True)[:count + 1]
        (folder / f"{task}_val.csv").write_text("".join(lines))
    return task_settings(folder)


def task_settings(folder: Path) -> dict[str, dict]:
    return {task: {"train_file": str(folder / f"{task}.csv"), "val_fraction": 0} for task in TASKS}


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``param``: its shard under FSDP2, where each rank updates its own."""
    return (param.to_local() if isinstance(param, DTensor) else param).detach()


class RecordTaskSteps(L.Callback):
    """Each rank writes, per step, its batch's tasks and rows and which tasks' adapters (its shards) the step moved."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath, self.steps, self.before, self.batch = dirpath, [], {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: local(p).clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.batch = {"tasks": sorted(set(batch.get("task", []))), "rows": batch["input_ids"].tolist()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        moved = {task for n, p in pl_module.named_parameters() for task in TASKS
                 if f".{task}." in n and not torch.equal(local(p), self.before[n])}
        self.steps.append({**self.batch, "moved": sorted(moved)})

    def on_fit_end(self, trainer, pl_module):
        (self.dirpath / f"steps_rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))


class SaveAndStopAt(L.Callback):
    """Saves a checkpoint after ``step`` optimizer steps, inside the epoch, and ends the fit, as a preempted job."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)  # by every rank, as ModelCheckpoint does
            trainer.should_stop = True


def multi_task(out: Path, name: str, strategy: Strategy, mixing: str = "alternating", batch_size: int = 8,
               *callbacks: L.Callback, ckpt_path: Path | None = None) -> None:
    """Two tasks, each adapter resting in the steps without its rows; records in ``name``."""
    folder = out / "multi_task"  # the model and data: written by the test before the launch (write_tasks)
    module = SequenceClassification(str(folder / "bert"), learning_rate=5e-2, warmup_steps=0)
    data = MultiTaskData(task_settings(folder), mixing=mixing, batch_size=batch_size, max_length=16)
    torch.manual_seed(0)
    methods = [LoRA(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                    adapter_name=task) for task in TASKS]
    (folder / name).mkdir(exist_ok=True)  # by both processes
    trainer(strategy, [*methods, RecordTaskSteps(folder / name), SaveAdapterPerRank(folder / name), *callbacks],
            max_epochs=1).fit(module, data, ckpt_path=ckpt_path)


def multi_task_resumed_inside_the_epoch(out: Path) -> None:
    """The DDP two-task fit stopped after two steps, saved, and resumed: records in ``ddp_stopped``/``ddp_resumed``."""
    checkpoint = out / "multi_task" / "ddp_stopped" / "step2.ckpt"
    multi_task(out, "ddp_stopped", DDPStrategy(find_unused_parameters=True), "alternating", 8,
               SaveAndStopAt(2, checkpoint))
    multi_task(out, "ddp_resumed", DDPStrategy(find_unused_parameters=True), ckpt_path=checkpoint)


def one_task_resumed_inside_the_epoch(out: Path) -> None:
    """One task's data (Lightning's DistributedSampler) under DDP with dropout: straight, and stopped after two of
    its three steps, saved and resumed; records in ``one_task/{straight,stopped,resumed}``."""
    folder = out / "one_task"

    def fit(name: str, *callbacks: L.Callback, ckpt_path: Path | None = None) -> None:
        module = SequenceClassification(str(out / "multi_task" / "bert"), learning_rate=5e-2, warmup_steps=0)
        data = TextClassificationData(**task_settings(out / "multi_task")["upbeat"], batch_size=8, max_length=16)
        torch.manual_seed(0)
        (folder / name).mkdir(parents=True, exist_ok=True)
        lora_with_dropout = LoRA(r=4, alpha=8, dropout=0.3, target_modules=["query", "value"],
                                 modules_to_save=["classifier"])
        trainer("ddp", [lora_with_dropout, RecordTaskSteps(folder / name), SaveAdapterPerRank(folder / name),
                        *callbacks], max_epochs=1).fit(module, data, ckpt_path=ckpt_path)

    fit("straight")
    fit("stopped", SaveAndStopAt(2, folder / "stopped" / "step2.ckpt"))
    fit("resumed", ckpt_path=folder / "stopped" / "step2.ckpt")


class RecordEvaluatedRows(L.Callback):
    """Each rank writes how many rows its last validation and its test ran and got right, and the logged accuracies."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath, self.seen = dirpath, {}

    def _record(self, stage: str, pl_module: L.LightningModule, batch: dict) -> None:
        right = pl_module(batch["input_ids"], batch["attention_mask"]).argmax(-1) == batch["labels"]
        rows, correct = self.seen.get(stage, (0, 0))
        self.seen[stage] = (rows + len(right), correct + int(right.sum()))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.seen.pop("val", None)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._record("val", pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._record("test", pl_module, batch)

    def on_fit_end(self, trainer, pl_module):
        self.val_acc = float(trainer.callback_metrics["val_acc"])

    def on_test_end(self, trainer, pl_module):
        record = {"seen": self.seen, "val_acc": self.val_acc, "test_acc": float(trainer.callback_metrics["test_acc"])}
        (self.dirpath / f"evaluated_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def uneven_evaluation(out: Path) -> None:
    """DDP validation and test of an evaluation file of UNEVEN rows: records in ``uneven``."""
    folder = out / "multi_task"
    module = SequenceClassification(str(folder / "bert"), learning_rate=5e-2, warmup_steps=0)
    data = TextClassificationData(train_file=str(folder / "upbeat.csv"), val_file=str(folder / "uneven.csv"),
                                  test_file=str(folder / "uneven.csv"), batch_size=4, max_length=16)
    (out / "uneven").mkdir(exist_ok=True)
    run = trainer("ddp", [LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
                          RecordEvaluatedRows(out / "uneven")], max_epochs=1, limit_train_batches=2)
    run.fit(module, data)
    run.test(module, data)


def multi_task_validation(out: Path) -> None:
    """DDP validation of two tasks, one of whose rows only one process gets: each rank's metrics in ``uneven``."""
    folder = out / "multi_task"
    tasks = {task: {"train_file": str(folder / f"{task}.csv"), "val_file": str(folder / f"{task}_val.csv")}
             for task in TASKS}
    data = MultiTaskData(tasks, batch_size=2, max_length=16)
    methods = [LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"], adapter_name=task) for task in TASKS]
    run = trainer("ddp", methods)
    metrics = run.validate(SequenceClassification(str(folder / "bert")), data)[0]  # was: a hang
    (out / "uneven" / f"tasks_rank{run.global_rank}.json").write_text(json.dumps(metrics))


def fsdp2() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def main(out: Path) -> None:
    fit_save_resume("ddp", lambda: "ddp", out)
    fit_save_resume("fsdp2", fsdp2, out)
    trainer(fsdp2(), [lora(use_dora=True), SaveAdapterPerRank(out / "fsdp2_dora")]).fit(SeededLlama(), loader())
    for name, method in SOFT_PROMPTS.items():  # read by hooks on the model, outside their units' forward
        trainer(fsdp2(), [method(), SaveAdapterPerRank(out / f"fsdp2_{name}")]).fit(SeededLlama(), loader())
    multi_task(out, "ddp", DDPStrategy(find_unused_parameters=True))
    multi_task_resumed_inside_the_epoch(out)
    one_task_resumed_inside_the_epoch(out)
    uneven_evaluation(out)
    multi_task_validation(out)
    multi_task(out, "fsdp2", fsdp2())
    multi_task(out, "ddp_mixed", DDPStrategy(find_unused_parameters=True), "mixed", batch_size=2)
    multi_task(out, "fsdp2_mixed", fsdp2(), "mixed", batch_size=2)  # often one task on one process, both on the other
    unused_adapter_fails_first(out)  # last: a failed fit tears the process group down


if __name__ == "__main__":
    main(Path(sys.argv[1]))
