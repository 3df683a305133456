"""Several tasks in one Trainer run: MultiTaskData routes each row to its task's adapter and head."""

import warnings

import lightning as L
import pytest
import torch
from test_cli import WORDS, recipe, run_cli, sentiment_rows, write_data
from torch.utils.data import DataLoader, DistributedSampler

from lightning_peft import BitFit, LoRA, Selective
from lightning_peft.data import MultiTaskData
from lightning_peft.data.multi_task import TaskBatchSampler
from lightning_peft.tasks import SequenceClassification

from conftest import VOCAB, TokenModule, make_trainer, tiny_bert_folder, tiny_gpt2, trainable_tensors

TASKS = ("upbeat", "gloomy")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny BERT classifier folder with its tokenizer and dropout (a resumed run must draw the same masks)."""
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny-bert"), WORDS)


def flipped(rows):
    """The other task's labelling: the same texts, the opposite labels, so one head cannot serve both tasks."""
    return [(text, "negative" if label == "positive" else "positive") for text, label in rows]


def task_files(folder):
    rows = {"upbeat": sentiment_rows(48, 0), "gloomy": flipped(sentiment_rows(32, 1))}
    return {name: {"train_file": str(write_data(folder, f"{name}-train", rows)),
                   "test_file": str(write_data(folder, f"{name}-test", rows[:16])), "val_fraction": 0}
            for name, rows in rows.items()}


def adapters():
    return [LoRA(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], adapter_name=task)
            for task in TASKS]


class StopAfterEpoch(L.Callback):
    """Interrupts a run at the end of its first epoch, as a preempted job stops."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


class EpochOrders(L.Callback):
    """Records the rows each epoch trains on, in order."""

    def __init__(self):
        self.rows = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.setdefault(trainer.current_epoch, []).extend(batch["input_ids"].tolist())


class TaskSteps(L.Callback):
    """Records at each step the batch's tasks, each task adapter's learning rate, and the trainable tensors."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        groups = trainer.optimizers[0].param_groups
        lrs = {task: [g["lr"] for g in groups if any(f".{task}." in names[id(p)] for p in g["params"])]
               for task in TASKS}
        self.steps.append((set(batch["task"]), lrs, trainable_tensors(pl_module)))


class ZeroedGradients(SequenceClassification):
    """Zeroes gradients instead of dropping them between steps, as some training loops do for speed."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)


def fit(model_dir, folder, mixing="mixed", callbacks_after=(), warmup_steps=0, module_class=SequenceClassification,
        **trainer):
    torch.manual_seed(0)  # the adapters' initial values: the same in every run
    module = module_class(str(model_dir), learning_rate=5e-2, warmup_steps=warmup_steps)
    data = MultiTaskData(task_files(folder), mixing=mixing, batch_size=8, max_length=16)
    trainer = make_trainer([*adapters(), *callbacks_after], **{"max_steps": 160, **trainer})
    trainer.fit(module, datamodule=data)
    return module, data, trainer


@pytest.mark.parametrize("mixing", ["mixed", "alternating"])
def test_two_tasks_with_opposite_labels_each_learn_their_own(tiny_model_dir, tmp_path, mixing):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, data, trainer = fit(tiny_model_dir, tmp_path, mixing)
    assert not [w for w in caught if "got no gradient" in str(w.message)]  # a task left out of a batch is no alarm
    results = trainer.test(module, datamodule=data, verbose=False)[0]
    assert results["test_acc_upbeat"] >= 0.9 and results["test_acc_gloomy"] >= 0.9, results  # opposite labels
    heads = module.model.classifier.adapters
    assert not torch.allclose(heads["upbeat"].weight, heads["gloomy"].weight)


def test_each_adapter_gets_no_gradient_from_the_other_tasks_rows(tiny_model_dir, tmp_path):
    module, data, _ = fit(tiny_model_dir, tmp_path, max_steps=1)
    batch = next(iter(data.train_dataloader()))
    assert set(batch["task"]) == set(TASKS)  # a mixed batch
    gloomy = [i for i, task in enumerate(batch["task"]) if task == "gloomy"]
    module.zero_grad(set_to_none=True)
    logits = module(batch["input_ids"], batch["attention_mask"], batch["task"])
    torch.nn.functional.cross_entropy(logits[gloomy], batch["labels"][gloomy]).backward()
    grads = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    assert all(g is None or not g.any() for name, g in grads.items() if ".upbeat." in name)
    assert any(g is not None and g.any() for name, g in grads.items() if ".gloomy." in name and "classifier" in name)


def task_rate(share, total, warmup, step, updates):
    """The rate a task's adapter should have: warmup over its own updates, then linear decay to 0 at the run's end,
    spread over the updates it had plus its share of the steps left."""
    if updates < warmup:
        return 5e-2 * updates / warmup
    ahead = share * (total - step)
    return 5e-2 * ahead / (ahead + updates - warmup)


def check_each_step(recorded, module, shares, total, warmup):
    """Each step's rates against `task_rate`, and only the batch's task moves; returns each task's updates."""
    updates = dict.fromkeys(TASKS, 0)
    after_each = [before for _, _, before in recorded.steps[1:]] + [trainable_tensors(module)]
    for step, ((tasks, lrs, before), after) in enumerate(zip(recorded.steps, after_each, strict=True)):
        for task in TASKS:
            assert lrs[task] == [pytest.approx(task_rate(shares[task], total, warmup, step, updates[task]))], step
        (task,) = tasks
        resting = next(other for other in TASKS if other != task)
        assert all(torch.equal(before[n], after[n]) for n in before if f".{resting}." in n)
        assert any(not torch.equal(before[n], after[n]) for n in before if f".{task}." in n) or updates[task] == 0
        updates[task] += 1
    return updates


def test_in_alternating_batches_each_adapter_keeps_its_own_schedule_and_rests_between(tiny_model_dir, tmp_path):
    recorded = TaskSteps()
    module, data, trainer = fit(tiny_model_dir, tmp_path, "alternating", [recorded], warmup_steps=3, max_steps=20)
    assert data.batch_shares == pytest.approx({"upbeat": 0.6, "gloomy": 0.4})  # 6 and 4 batches of 8 rows an epoch
    assert check_each_step(recorded, module, data.batch_shares, 20, 3) == {"upbeat": 12, "gloomy": 8}
    assert [group["lr"] for group in trainer.optimizers[0].param_groups] == [0.0, 0.0]  # zero at the run's end


def test_a_task_that_draws_more_than_its_share_learns_until_the_last_step(tiny_model_dir, tmp_path):
    recorded = TaskSteps()
    module, data, _ = fit(tiny_model_dir, tmp_path, "alternating", [recorded], warmup_steps=2, max_steps=8)
    updates = check_each_step(recorded, module, data.batch_shares, 8, 2)
    (task,) = [task for task in TASKS if updates[task] > round(8 * data.batch_shares[task])]  # the epoch's cut
    last = max(i for i, (tasks, _, _) in enumerate(recorded.steps) if tasks == {task})
    assert recorded.steps[last][1][task][0] > 0  # its last update still learns


def test_a_resting_adapter_stays_put_when_the_loop_zeroes_gradients_instead_of_dropping_them(tiny_model_dir,
                                                                                            tmp_path):
    recorded = TaskSteps()
    module, data, _ = fit(tiny_model_dir, tmp_path, "alternating", [recorded], module_class=ZeroedGradients,
                          max_steps=20)
    assert check_each_step(recorded, module, data.batch_shares, 20, 0) == {"upbeat": 12, "gloomy": 8}


def test_an_adapter_of_no_task_serves_every_row_and_trains_at_every_step(tiny_model_dir, tmp_path):
    recorded = TaskSteps()
    module, _, _ = fit(tiny_model_dir, tmp_path, "alternating", [BitFit(adapter_name="shared"), recorded],
                       max_steps=4)
    after_each = [before for _, _, before in recorded.steps[1:]] + [trainable_tensors(module)]
    for (_, _, before), after in zip(recorded.steps, after_each, strict=True):
        shared = [n for n in before if n.endswith("bias") and ".adapters." not in n]  # BitFit's: the model's own
        assert sum(not torch.equal(before[n], after[n]) for n in shared) >= len(shared) - 1  # not the key's bias


class DictBatches(TokenModule):
    """Reads ``input_ids`` from a batch dict, whatever else the dict holds."""

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["input_ids"],), batch_idx)


def test_each_task_s_metrics_are_logged_where_its_rows_were_evaluated(tiny_model_dir, tmp_path):
    module, data, _ = fit(tiny_model_dir, tmp_path, max_steps=2)
    tested = make_trainer([]).test(module, dataloaders=data.test_dataloader())[0]  # no data module: as before
    assert {"test_acc_upbeat", "test_acc_gloomy"} <= set(tested)
    first = make_trainer([], limit_test_batches=1).test(module, dataloaders=data.test_dataloader())[0]
    assert "test_acc_upbeat" in first and "test_acc_gloomy" not in first  # its rows come later: not a 0.0


def test_a_batch_with_a_task_column_outside_multi_task_data_trains_as_any_batch():
    model = DictBatches(tiny_gpt2())
    loader = DataLoader([{"input_ids": torch.randint(0, VOCAB, (12,)), "task": "summarize"} for _ in range(8)],
                        batch_size=4)
    make_trainer([LoRA(r=4, target_modules=["c_attn"])], max_steps=2).fit(model, loader)
    assert any(p.any() for n, p in model.named_parameters() if n.endswith("lora_B"))  # trained: not resting


def test_a_resumed_multi_task_run_ends_where_the_uninterrupted_one_does(tiny_model_dir, tmp_path):
    orders = EpochOrders()
    uninterrupted, _, _ = fit(tiny_model_dir, tmp_path, max_epochs=2, max_steps=-1, callbacks_after=[orders])
    assert orders.rows[0] != orders.rows[1]  # Lightning gives each epoch its own order
    first, _, trainer = fit(tiny_model_dir, tmp_path, max_epochs=2, max_steps=-1, callbacks_after=[StopAfterEpoch()])
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)["state_dict"]
    assert {n for n in saved if ".upbeat." in n} and {n for n in saved if ".gloomy." in n}  # every adapter
    resumed = SequenceClassification(str(tiny_model_dir), learning_rate=5e-2, warmup_steps=0)
    data = MultiTaskData(task_files(tmp_path), batch_size=8, max_length=16)
    make_trainer(adapters(), max_epochs=2, max_steps=-1).fit(resumed, datamodule=data,
                                                              ckpt_path=tmp_path / "epoch1.ckpt")
    expected, got = trainable_tensors(uninterrupted), trainable_tensors(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("stop", [3, 10, 12])  # inside the first epoch (of 10 batches), at its end, in the second
def test_a_multi_task_run_resumed_inside_an_epoch_goes_on_with_its_next_batch(tiny_model_dir, tmp_path, stop):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_checkpoints import StopAt

    orders = EpochOrders()
    uninterrupted, data, _ = fit(tiny_model_dir, tmp_path, max_steps=16, callbacks_after=[orders])
    assert len(orders.rows) == 2 and len(data.train_dataloader()) == 10
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    fit(tiny_model_dir, tmp_path, max_steps=16, callbacks_after=[saver, StopAt(stop)], enable_checkpointing=True)
    torch.manual_seed(0)
    resumed = SequenceClassification(str(tiny_model_dir), learning_rate=5e-2, warmup_steps=0)
    data = MultiTaskData(task_files(tmp_path), batch_size=8, max_length=16)
    resume_from = tmp_path / "ckpt" / f"step={stop}.ckpt"
    make_trainer(adapters(), max_steps=16).fit(resumed, datamodule=data, ckpt_path=resume_from)
    expected, got = trainable_tensors(uninterrupted), trainable_tensors(resumed)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_multi_task_run_resumed_inside_an_epoch_with_another_batch_size_is_refused(tiny_model_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_checkpoints import StopAt

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    fit(tiny_model_dir, tmp_path, max_steps=16, callbacks_after=[saver, StopAt(3)], enable_checkpointing=True)
    resumed = SequenceClassification(str(tiny_model_dir), learning_rate=5e-2, warmup_steps=0)
    data = MultiTaskData(task_files(tmp_path), batch_size=4, max_length=16)
    with pytest.raises(ValueError, match="saved inside an epoch of batch_size 8, and this fit.s batch_size"):
        make_trainer(adapters(), max_steps=16).fit(resumed, datamodule=data,  # was: rows repeated and others skipped
                                                   ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")


def test_batches_follow_mixing_and_weights_and_each_epoch_has_its_order():
    sizes = {"a": 10, "b": 30}
    mixed = TaskBatchSampler(sizes, 8, "mixed", None, seed=0)
    rows = [i for batch in mixed for i in batch]
    assert sorted(rows) == list(range(40)) and len(list(mixed)) == len(mixed) == 5  # each row once an epoch
    first = list(mixed)
    mixed.set_epoch(1)
    assert list(mixed) != first
    mixed.set_epoch(0)
    assert list(mixed) == first
    alternating = list(TaskBatchSampler(sizes, 8, "alternating", None, seed=0))
    assert all(max(batch) < 10 or min(batch) >= 10 for batch in alternating)  # one task a batch
    assert sorted(i for batch in alternating for i in batch) == list(range(40))
    only_b = TaskBatchSampler(sizes, 8, "mixed", {"b": 1.0}, seed=0)
    assert all(i >= 10 for batch in only_b for i in batch)
    drawn = [i for batch in TaskBatchSampler({"a": 10, "b": 3000}, 10, "mixed", {"a": 3.0, "b": 1.0}, seed=0)
             for i in batch]  # a task by its weight, then one of its rows (was: a draw over rows, failing past 2**24)
    assert 0.7 < sum(i < 10 for i in drawn) / len(drawn) < 0.8 and len(set(i for i in drawn if i < 10)) == 10
    assert min(drawn) >= 0 and max(drawn) < 3010 and len(set(drawn)) > 500  # b's ~750 draws, spread
    weighted = list(TaskBatchSampler(sizes, 4, "alternating", {"a": 3.0, "b": 1.0}, seed=0))
    assert list(TaskBatchSampler(sizes, 4, "alternating", {"a": 3, "b": 1}, seed=0)) == weighted  # integer weights
    share_a = sum(max(batch) < 10 for batch in weighted) / len(weighted)
    assert 0.55 < share_a < 0.95  # a: three times b's chance, despite a third of b's rows
    assert TaskBatchSampler(sizes, 8, "alternating", None, seed=0).shares() == pytest.approx({"a": 2 / 6, "b": 4 / 6})
    assert TaskBatchSampler(sizes, 4, "alternating", {"a": 3.0, "b": 1.0}, seed=0).shares() == pytest.approx(
        {"a": 0.75, "b": 0.25})
    mixed_shares = TaskBatchSampler(sizes, 8, "mixed", None, seed=0).shares()
    assert mixed_shares == pytest.approx({"a": 1 - 0.75 ** 8, "b": 1 - 0.25 ** 8})  # batches with >= 1 of its rows
    two_batches = TaskBatchSampler(sizes, 8, "alternating", None, seed=0).shares(accumulated=2)  # a step
    assert two_batches == pytest.approx({"a": 1 - (4 / 6) ** 2, "b": 1 - (2 / 6) ** 2})  # >= 1 of its batches
    assert TaskBatchSampler(sizes, 8, "mixed", None, seed=0).shares(2) == pytest.approx(
        {"a": 1 - 0.75 ** 16, "b": 1 - 0.25 ** 16})


@pytest.mark.parametrize("mixing, weights", [("alternating", None), ("alternating", {"a": 3.0, "b": 1.0}),
                                              ("mixed", None)])
def test_each_process_gets_its_own_batches_the_same_number_and_in_alternating_batches_the_same_task(mixing, weights):
    sizes = {"a": 20, "b": 44}  # 5 and 11 batches of 4: odd counts, so the last step of each is filled up
    ranks = [list(TaskBatchSampler(sizes, 4, mixing, weights, seed=0,
                                   sampler=DistributedSampler(range(64), num_replicas=2, rank=rank)))
             for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(TaskBatchSampler(
        sizes, 4, mixing, weights, seed=0, sampler=DistributedSampler(range(64), num_replicas=2, rank=0)))
    task = [[min(batch) >= 20 for batch in rank] for rank in ranks]
    if mixing == "alternating":
        assert all(all(i >= 20 for i in batch) or all(i < 20 for i in batch) for rank in ranks for batch in rank)
        assert task[0] == task[1]  # every process trains the same task at each step
    if mixing == "alternating" and weights is None:  # the steps each task's adapter gets, as its schedule counts
        shares = TaskBatchSampler(sizes, 4, mixing, weights, 0, DistributedSampler(range(64), 2, 0)).shares()
        steps = len(task[0])
        assert shares == pytest.approx({"a": task[0].count(False) / steps, "b": task[0].count(True) / steps})
    pairs = [(first, second) for first, second in zip(*ranks, strict=True)]
    assert sum(first == second for first, second in pairs) <= 2  # only a filled-up last step repeats a batch
    if weights is None:
        assert {i for rank in ranks for batch in rank for i in batch} == set(range(64))  # every row, every epoch


def test_mistakes_are_one_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="task name 'a.b'"):
        MultiTaskData({"a.b": {"source": "tweets"}})
    with pytest.raises(ValueError, match="task 'x' sets batch_size; set it once"):
        MultiTaskData({"x": {"source": "tweets", "batch_size": 4}})
    with pytest.raises(ValueError, match="task 'x': .*unknown_source"):
        MultiTaskData({"x": {"source": "unknown_source"}})
    with pytest.raises(ValueError, match="weights name unknown task 'z'"):
        MultiTaskData({"x": {"source": "tweets"}}, weights={"z": 1.0})
    lonely = {"train_file": str(write_data(tmp_path, "lonely", sentiment_rows(1, 2))), "val_fraction": 0.5}
    data = MultiTaskData({**task_files(tmp_path), "lonely": lonely}, weights={"upbeat": 1, "lonely": 1},
                         tokenizer=SequenceClassification(str(tiny_model_dir)).tokenizer)
    with pytest.raises(ValueError, match="training data has 1 row: too few to hold out val_fraction 0.5"):
        data.setup("fit")  # its one row would go to validation, and its weight draw from no rows
    module = SequenceClassification(str(tiny_model_dir))
    data = MultiTaskData(task_files(tmp_path), batch_size=8, max_length=16)
    with pytest.raises(ValueError, match="task 'gloomy' has no adapter of its name"):
        make_trainer(adapters()[:1]).fit(module, datamodule=data)
    own = [adapters()[0], Selective(modules=["key"], adapter_name="gloomy")]  # the model's keys: every task's
    with pytest.raises(ValueError, match="rows name 'gloomy', whose adapter trains the model's own parameters"):
        make_trainer(own).fit(SequenceClassification(str(tiny_model_dir)), datamodule=data)


def test_a_multi_task_recipe_fits_tests_each_task_and_saves_each_adapter(tiny_model_dir, tmp_path):
    import yaml

    config = recipe(tmp_path, tiny_model_dir, tmp_path / "unused.csv")
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"] = [{"class_path": "lightning_peft.LoRA", "init_args": {
        "r": 4, "alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"],
        "adapter_name": task}} for task in TASKS]
    settings["trainer"]["max_steps"] = 100
    settings["data"] = {"class_path": "lightning_peft.data.MultiTaskData", "init_args": {
        "tasks": task_files(tmp_path), "mixing": "alternating", "batch_size": 8, "max_length": 16}}
    config.write_text(yaml.safe_dump(settings))
    fit = run_cli("fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    for task in TASKS:
        assert float(fit.stdout.split(f"test_acc_{task}: ")[1].split()[0]) >= 0.9, fit.stdout
        assert (tmp_path / "adapter" / f"LoRA-{task}" / "adapter_model.safetensors").is_file()
    assert "got no gradient" not in fit.stderr
    check_merged_export_of_one_task(next(tmp_path.rglob("*.ckpt")), tmp_path / "merged")


def check_merged_export_of_one_task(ckpt, out):
    """A merged model of a multi-task checkpoint: refused without --adapter; one task's with it."""
    from transformers import AutoModelForSequenceClassification

    from lightning_peft.export import export_checkpoint, rebuild_from_checkpoint

    with pytest.raises(ValueError, match="holds adapters upbeat, gloomy; merging them all would add every task's"):
        export_checkpoint(ckpt, out, merged=True)
    trained = rebuild_from_checkpoint(ckpt)
    ids = torch.tensor([[2, 13, 11, 14, 15, 6, 3]])
    with torch.no_grad():
        expected = {task: trained(ids, tasks=[task]) for task in TASKS}
        for task in TASKS:
            merged = AutoModelForSequenceClassification.from_pretrained(
                export_checkpoint(ckpt, out / task, merged=True, adapter=task)).eval()
            torch.testing.assert_close(merged(input_ids=ids).logits, expected[task], atol=1e-5, rtol=1e-5)


def test_evaluating_a_multi_task_checkpoint_without_its_routing_is_refused(tiny_model_dir, tmp_path):
    from lightning_peft.data import TextClassificationData

    module, data, trainer = fit(tiny_model_dir, tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "tasks.ckpt")

    def test(data):
        fresh = SequenceClassification(str(tiny_model_dir), learning_rate=5e-2, labels=module.labels)
        return make_trainer(adapters()).test(fresh, datamodule=data, ckpt_path=tmp_path / "tasks.ckpt", verbose=False)

    assert test(MultiTaskData(task_files(tmp_path), batch_size=8, max_length=16))  # with routing: each task's score
    plain = TextClassificationData(test_file=task_files(tmp_path)["upbeat"]["test_file"], batch_size=8, max_length=16)
    with pytest.raises(ValueError, match=r"holds one adapter per task \(upbeat, gloomy\), and this data routes no "
                                         r"rows to them"):  # was: every task's adapter at once, a score of neither
        test(plain)
