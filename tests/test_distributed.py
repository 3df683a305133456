"""LoRA under DDP, FSDP2 and two torchrun nodes (two processes on CPU, gloo, 127.0.0.1); FSDP1 on CUDA.

The multi-process runs are launched once per module (distributed_worker.py) and checked by
several tests; each launch has a timeout, so a hang fails instead of blocking.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import yaml
from distributed_worker import (
    PER_RANK_BATCH,
    SOFT_PROMPTS,
    TASKS,
    UNEVEN,
    WORDS,
    SeededLlama,
    loader,
    lora,
    write_tasks,
)
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from lightning_peft import BitFit, LoRA, PromptTuning, trainable_summary
from lightning_peft.lightning.sharding import (
    check_tasks_can_rest,
    check_units_do_not_mix,
    fsdp_auto_wrap_policy,
    full_adapter_state_dict,
    fully_shard_peft,
    prepare_sharding,
    sharding_units,
)

from conftest import (
    ImageModule,
    TokenModule,
    image_loader,
    make_trainer,
    tiny_bert,
    tiny_bert_folder,
    tiny_llama,
    token_loader,
)

TESTS = Path(__file__).parent
LAUNCH_TIMEOUT = 300  # seconds; each launch takes 60-90 on two loaded cores
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """Commands started side by side, each in its own process group, with output to files (a full pipe blocks)."""

    def __init__(self, commands: list[list[str]], timeout: float = LAUNCH_TIMEOUT, **env: str) -> None:
        pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **env}
        self.logs = [tempfile.TemporaryFile("w+") for _ in commands]
        self.procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                      for cmd, log in zip(commands, self.logs, strict=True)]
        self.deadline = time.monotonic() + timeout

    def outputs(self) -> list[str]:
        """Wait for every process and return their outputs; fail when one fails or is still running at the deadline."""
        try:
            for proc in self.procs:
                proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{[proc.args for proc in self.procs]} still running at the deadline (a hang?)")
        outputs = []
        for proc, log in zip(self.procs, self.logs, strict=True):
            log.seek(0)
            outputs.append(log.read())
            assert proc.returncode == 0, outputs[-1][-4000:]
        return outputs

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


# --- two processes, one launch: DDP and FSDP2 ---------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, two_nodes) -> Path:
    """The worker's results; asks for ``two_nodes`` so that both launches run side by side."""
    out = tmp_path_factory.mktemp("two_processes")
    (out / "multi_task").mkdir()
    write_tasks(out / "multi_task")  # here, once: both processes read it
    launch = Launch([[sys.executable, str(TESTS / "distributed_worker.py"), str(out)]], MASTER_PORT=str(free_port()))
    try:
        launch.outputs()
    finally:
        launch.kill()
    return out


def same_global_batches() -> DataLoader:
    """Lightning shuffles training data with DistributedSampler(seed=0): one replica of it reads the same batches."""
    dataset = loader().dataset
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    return DataLoader(dataset, batch_size=2 * PER_RANK_BATCH, sampler=sampler)


def single_process_adapter(method=None, **lora_kwargs) -> dict[str, torch.Tensor]:
    module = SeededLlama()
    make_trainer([method or lora(**lora_kwargs)], max_epochs=2, max_steps=-1).fit(module, same_global_batches())
    return full_adapter_state_dict(module)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return single_process_adapter()


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = TOLERANCE) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=atol), (name, (got[name] - expected[name]).abs().max())


def rank_files(folder: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(folder / f"{name}_rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one_with_the_same_global_batch(runs, reference, strategy):
    for adapter in rank_files(runs / strategy, "adapter"):
        assert_close(adapter, reference)
    assert all(t.abs().sum() > 0 for n, t in reference.items() if n.endswith("lora_B"))  # B starts at 0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_checkpoints_hold_the_adapter_as_full_tensors(runs, reference, strategy):
    path = runs / strategy / "epoch1.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["lightning_peft"]["adapter_only"] is True
    assert {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()} == \
        {k: tuple(v.shape) for k, v in reference.items()}
    assert all(type(v) is torch.Tensor for v in checkpoint["state_dict"].values())  # gathered, not DTensor
    assert checkpoint["optimizer_states"] and checkpoint["global_step"] == 2
    assert path.stat().st_size < 100_000  # the base (27,680 - 896 parameters) is left out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_from_an_adapter_checkpoint_continues_exactly(runs, strategy):
    uninterrupted = rank_files(runs / strategy, "adapter")[0]
    for resumed in rank_files(runs / strategy, "resumed"):
        assert_close(resumed, uninterrupted, atol=1e-6)


@pytest.mark.parametrize("method", SOFT_PROMPTS)
def test_soft_prompts_under_fsdp2_match_one_process(runs, method):
    expected = single_process_adapter(SOFT_PROMPTS[method]())
    for adapter in rank_files(runs / f"fsdp2_{method}", "adapter"):
        assert_close(adapter, expected)
    untrained = SeededLlama()
    untrained.configure_model()
    SOFT_PROMPTS[method]().inject(untrained)
    assert all(not torch.allclose(t, expected[n]) for n, t in full_adapter_state_dict(untrained).items())  # trained


def test_dora_under_fsdp2_matches_one_process(runs):
    expected = single_process_adapter(use_dora=True)
    for adapter in rank_files(runs / "fsdp2_dora", "adapter"):
        assert_close(adapter, expected)


def test_ddp_names_an_adapter_outside_the_loss_before_its_reducer_fails(runs):
    for rank in (0, 1):
        message = (runs / f"unused_rank{rank}.txt").read_text()
        assert message.startswith("step 0: ")  # after the first backward, before any optimizer step
        assert "unused_head.adapters.default.lora_A, unused_head.adapters.default.lora_B" in message
        assert "q_proj" not in message and "Expected to have finished reduction" not in message


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_each_process_gets_its_own_batch_of_one_task_a_step_and_the_other_adapter_rests(runs, strategy):
    ranks = [json.loads((runs / "multi_task" / strategy / f"steps_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5  # 3 steps of upbeat, 2 of gloomy: 10 batches of 8 on two processes
    for first, second in zip(*ranks, strict=True):
        assert len(first["tasks"]) == 1 and first["tasks"] == second["tasks"]  # one task a step, on both
        assert first["moved"] == second["moved"] == first["tasks"] or not first["moved"]  # the other rests
    rows = sorted(tuple(row) for rank in ranks for step in rank for row in step["rows"])
    assert len(rows) == sum(TASKS.values()) and len(set(rows)) == len(rows)  # every row once, none twice
    assert sum(step["moved"] == ["gloomy"] for step in ranks[0]) >= 1  # each adapter trained
    assert sum(step["moved"] == ["upbeat"] for step in ranks[0]) >= 2
    first, second = rank_files(runs / "multi_task" / strategy, "adapter")
    assert_close(second, first, atol=0)  # the processes stay in step


def test_two_tasks_under_ddp_resumed_inside_the_epoch_train_the_uninterrupted_run_s_batches(runs):
    def steps(name: str) -> list[list[dict]]:
        return [json.loads((runs / "multi_task" / name / f"steps_rank{rank}.json").read_text()) for rank in (0, 1)]

    stopped, resumed, straight = steps("ddp_stopped"), steps("ddp_resumed"), steps("ddp")
    assert [len(rank) for rank in stopped] == [2, 2] and [len(rank) for rank in resumed] == [3, 3]
    for rank in (0, 1):  # each process carries on with its own next batches: none again, none left out
        assert [step["rows"] for step in stopped[rank] + resumed[rank]] == [step["rows"] for step in straight[rank]]
    first, second = rank_files(runs / "multi_task" / "ddp_resumed", "adapter")
    assert_close(first, rank_files(runs / "multi_task" / "ddp", "adapter")[0])
    assert_close(second, first, atol=0)


def test_one_task_under_ddp_resumed_inside_the_epoch_trains_the_uninterrupted_run_s_batches_and_dropout(runs):
    def steps(name: str) -> list[list[dict]]:
        return [json.loads((runs / "one_task" / name / f"steps_rank{rank}.json").read_text()) for rank in (0, 1)]

    stopped, resumed, straight = steps("stopped"), steps("resumed"), steps("straight")
    assert [len(rank) for rank in stopped] == [2, 2] and [len(rank) for rank in resumed] == [1, 1]
    for rank in (0, 1):  # was: the resumed fit trained the epoch's first batch again and never its last
        assert [step["rows"] for step in stopped[rank] + resumed[rank]] == [step["rows"] for step in straight[rank]]
    first, second = rank_files(runs / "one_task" / "resumed", "adapter")
    assert_close(first, rank_files(runs / "one_task" / "straight", "adapter")[0], atol=0)  # each rank's dropout too
    assert_close(second, first, atol=0)


def test_ddp_validates_and_tests_each_row_once_and_the_metrics_count_each_once(runs):
    ranks = [json.loads((runs / "uneven" / f"evaluated_rank{rank}.json").read_text()) for rank in (0, 1)]
    for stage in ("val", "test"):
        rows, correct = (sum(rank["seen"][stage][i] for rank in ranks) for i in (0, 1))
        assert rows == UNEVEN, stage  # Lightning's DistributedSampler would give each process 8: one row twice
        assert ranks[0][f"{stage}_acc"] == ranks[1][f"{stage}_acc"] == pytest.approx(correct / UNEVEN), stage
    tasks = [json.loads((runs / "uneven" / f"tasks_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert tasks[0] == tasks[1] and {f"val_acc_{task}" for task in TASKS} <= set(tasks[0])  # one had no upbeat row


@pytest.mark.parametrize("strategy", ["ddp_mixed", "fsdp2_mixed"])
def test_in_mixed_batches_an_adapter_steps_where_any_process_had_its_rows_and_rests_where_none_had(runs, strategy):
    ranks = [json.loads((runs / "multi_task" / strategy / f"steps_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20  # 80 rows in batches of 2 on two processes
    for first, second in zip(*ranks, strict=True):
        assert first["moved"] == second["moved"] == sorted({*first["tasks"], *second["tasks"]})
    assert any(first["tasks"] != second["tasks"] for first, second in zip(*ranks, strict=True))  # rows elsewhere
    assert any(len({*first["tasks"], *second["tasks"]}) == 1 for first, second in zip(*ranks, strict=True))  # rest
    first, second = rank_files(runs / "multi_task" / strategy, "adapter")
    assert_close(second, first, atol=0)  # the processes stay in step


def test_several_tasks_under_ddp_without_find_unused_parameters_are_refused_before_a_step(
        lightning_launch_in_this_process, tmp_path):
    from lightning_peft.data import MultiTaskData
    from lightning_peft.tasks import SequenceClassification

    tasks = write_tasks(tmp_path)
    module = SequenceClassification(str(tmp_path / "bert"), warmup_steps=0)
    data = MultiTaskData(tasks, mixing="mixed", batch_size=8, max_length=16)
    methods = [LoRA(r=4, target_modules=["query"], adapter_name=task) for task in TASKS]
    with pytest.raises(ValueError, match=r"several tasks under DDP: .*DDPStrategy\(find_unused_parameters=True\)"):
        make_trainer(methods, strategy="ddp", max_steps=2).fit(module, datamodule=data)
    assert module.global_step == 0


@pytest.mark.parametrize(("strategy", "mixing", "method", "refused"), [
    (FSDPStrategy(), "alternating", LoRA, r"several tasks under FSDP1 \(FSDPStrategy\): .* ModelParallelStrategy"),
    (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "mixed", PromptTuning,
     r"mixed batches of several PromptTuning tasks under FSDP2 .* use mixing='alternating'"),
    (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "alternating", PromptTuning, None),
    (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "mixed", LoRA, None),
], ids=["fsdp1", "fsdp2 mixed prompts", "fsdp2 alternating prompts", "fsdp2 mixed lora"])
def test_several_tasks_under_fsdp_are_refused_where_a_resting_adapter_breaks_the_reduction(
        tmp_path, strategy, mixing, method, refused):
    from lightning_peft.data import MultiTaskData

    data = MultiTaskData(write_tasks(tmp_path), mixing=mixing, batch_size=8, max_length=16)
    settings = {"target_modules": ["q_proj"]} if method is LoRA else {"num_virtual_tokens": 2}
    model = tiny_llama()
    for task in TASKS:
        method(adapter_name=task, **settings).inject(model)
    trainer = SimpleNamespace(datamodule=data, strategy=strategy, world_size=2, lightning_module=model)  # on a rank
    if refused is None:
        check_tasks_can_rest(trainer)  # the worker's FSDP2 runs train such batches (the tests above)
        return
    with pytest.raises(ValueError, match=refused):
        check_tasks_can_rest(trainer)


# --- two nodes with torchrun, running a recipe --------------------------------------------------
def two_node_recipe(tmp_path: Path) -> Path:
    rows = [(f"the movie was very {WORDS[i % 6]}", "positive" if i % 6 < 3 else "negative") for i in range(32)]
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "strategy": "ddp", "num_nodes": 2, "devices": 1, "max_steps": 4,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning_peft.LoRA", "init_args": {
                    "r": 4, "alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}},
                {"class_path": "distributed_worker.SaveAdapterPerRank", "init_args": {"dirpath": str(tmp_path)}},
            ],
        },
        "model": {"class_path": "lightning_peft.tasks.SequenceClassification",
                  "init_args": {"model": str(tiny_bert_folder(tmp_path / "bert", WORDS)), "learning_rate": 0.1,
                                "warmup_steps": 0}},
        "data": {"class_path": "lightning_peft.data.TextClassificationData",
                 "init_args": {"train_file": str(train), "batch_size": 4, "max_length": 16, "val_fraction": 0}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[tuple[Launch, Path]]:
    """Two torchrun "nodes" of one process each, rendezvous on 127.0.0.1, running the recipe."""
    folder = tmp_path_factory.mktemp("two_nodes")
    recipe, port = two_node_recipe(folder), free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--master-addr=127.0.0.1", f"--master-port={port}"]
    launch = Launch([[*node, f"--node-rank={rank}", "-m", "lightning_peft.cli", "fit", "--config", str(recipe)]
                     for rank in (0, 1)])
    yield launch, folder
    launch.kill()


def test_two_torchrun_nodes_train_one_adapter(two_nodes):
    launch, folder = two_nodes
    outputs = launch.outputs()
    assert "MEMBER: 1/2" in outputs[0] and "MEMBER: 2/2" in outputs[1]  # one world of two processes
    first, second = rank_files(folder, "adapter")
    assert_close(second, first, atol=0)
    assert any(name.endswith("lora_B") for name in first)
    assert all(t.abs().sum() > 0 for n, t in first.items() if n.endswith("lora_B"))  # trained away from B = 0


# --- in one process -----------------------------------------------------------------------------
def injected_llama(**lora_kwargs) -> torch.nn.Module:
    model = tiny_llama()
    LoRA(r=4, target_modules=["q_proj", "v_proj"], **lora_kwargs).inject(model)
    return model


def test_units_put_frozen_and_trainable_parameters_apart():
    model = injected_llama(modules_to_save=["lm_head"])
    names = {module: name for name, module in model.named_modules()}
    units = [names[unit] for unit in sharding_units(model)]
    assert units[:6] == ["lm_head.base_layer", "lm_head",  # the frozen head, then the adapter's copy of it
                         "model.layers.1.self_attn.v_proj.base_layer", "model.layers.1.self_attn.v_proj",
                         "model.layers.1.self_attn.q_proj.base_layer", "model.layers.1.self_attn.q_proj"]
    assert units[6] == "model.layers.1" and units[-1] == "model.layers.0"
    check_units_do_not_mix(model, sharding_units(model))
    policy = fsdp_auto_wrap_policy(model)
    assert policy(module=model.model.layers[0].self_attn.q_proj, recurse=False, nonwrapped_numel=0)
    assert not policy(module=model.model.layers[0].self_attn, recurse=False, nonwrapped_numel=0)


@pytest.mark.parametrize("settings", [dict(target_modules=["q_proj", "lm_head"]),
                                      dict(target_modules=["q_proj"], modules_to_save=["lm_head"])])
def test_a_weight_tied_across_units_is_refused_by_name(settings):
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    LoRA(r=4, **settings).inject(model)
    with pytest.raises(ValueError, match=r"cannot shard 'lm_head.base_layer' apart: its parameter 'weight' is tied to "
                                         r"'model.embed_tokens'"):
        check_units_do_not_mix(model, sharding_units(model))
    untied = tiny_llama()
    LoRA(r=4, **settings).inject(untied)
    check_units_do_not_mix(untied, sharding_units(untied))  # fine


@pytest.fixture
def one_process_mesh():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_fully_shard_peft_keeps_ownership_and_refuses_a_sharded_model(one_process_mesh):
    model = injected_llama()
    methods = trainable_summary(model).methods
    fully_shard_peft(model, one_process_mesh)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FSDPModule) and isinstance(layer.base_layer, FSDPModule)
    assert trainable_summary(model).methods == methods  # claims follow the new (DTensor) parameters
    sharded = tiny_llama()
    fully_shard(sharded, mesh=one_process_mesh)
    with pytest.raises(ValueError, match="already sharded"):
        fully_shard_peft(sharded, one_process_mesh)


def test_save_adapter_gathers_an_fsdp2_sharded_adapter(one_process_mesh, tmp_path):
    from safetensors.torch import load_file

    from lightning_peft import IA3, save_adapter

    model = injected_llama()
    IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], adapter_name="ia3").inject(model)
    for name in ("default", "ia3"):
        save_adapter(model, tmp_path / f"plain-{name}", adapter_name=name)
    fully_shard_peft(model, one_process_mesh)
    for name in ("default", "ia3"):  # failed on DTensors: ".numpy() is not supported", "would reshape sharded dim"
        save_adapter(model, tmp_path / f"sharded-{name}", adapter_name=name)
        assert_close(load_file(tmp_path / f"sharded-{name}" / "adapter_model.safetensors"),
                     load_file(tmp_path / f"plain-{name}" / "adapter_model.safetensors"), atol=0)


@pytest.fixture
def lightning_launch_in_this_process():
    """Lightning's launcher sets rank variables, threads and a process group in this process: undo them after."""
    environment, threads = dict(os.environ), torch.get_num_threads()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(threads)


def test_a_model_built_in_init_is_sharded_after_injection(lightning_launch_in_this_process, tmp_path):
    module = TokenModule(tiny_llama())  # built here, so not in configure_model
    trainer = make_trainer([LoRA(r=4, target_modules=["q_proj"])], max_steps=2,
                           strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    trainer.fit(module, token_loader())
    layer = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FSDPModule) and isinstance(layer.base_layer, FSDPModule)
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    saved = torch.load(tmp_path / "adapter.ckpt", weights_only=True)["state_dict"]
    assert sorted(saved) == sorted(full_adapter_state_dict(module)) and len(saved) == 4
    again = make_trainer([LoRA(r=4, target_modules=["q_proj"])], max_steps=3,  # a later Trainer, the module sharded
                         strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    again.fit(module, token_loader())
    again.save_checkpoint(tmp_path / "again.ckpt")  # was: a folder of the whole model's shards
    assert sorted(torch.load(tmp_path / "again.ckpt", weights_only=True)["state_dict"]) == sorted(saved)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_qlora_under_fsdp2_keeps_the_quantized_base_whole_and_trains(lightning_launch_in_this_process, tmp_path,
                                                                        mode):
    from lightning_peft import QuantizeBase
    from lightning_peft.core.weights import is_quantized

    module = TokenModule(tiny_llama())
    trainer = make_trainer([QuantizeBase(mode), LoRA(r=4, target_modules=["q_proj", "v_proj"])], max_steps=3,
                           strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    trainer.fit(module, token_loader())  # failed with "'DTensor' object has no attribute 'SCB'" before
    quantized = [m for m in module.modules() if is_quantized(m)]
    assert quantized and not any(isinstance(p, DTensor) for m in quantized for p in m.parameters())
    adapters = [p for n, p in module.named_parameters() if "lora_" in n]
    assert adapters and all(isinstance(p, DTensor) for p in adapters)  # the adapters are sharded
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    saved = torch.load(tmp_path / "adapter.ckpt", weights_only=True)["state_dict"]
    assert sorted(saved) == sorted(full_adapter_state_dict(module)) and len(saved) == 8


def test_a_checkpoint_from_one_device_resumes_under_fsdp2_with_each_parameter_s_optimizer_state(
        lightning_launch_in_this_process, tmp_path):
    from lightning_peft.core.weights import whole

    one_device = make_trainer([LoRA(r=4, target_modules=["q_proj", "v_proj"])], max_steps=2)
    module = TokenModule(tiny_llama())
    one_device.fit(module, token_loader())
    one_device.save_checkpoint(tmp_path / "one.ckpt")
    trained = [name for name, p in module.named_parameters() if p.requires_grad]  # the optimizer's order
    saved = torch.load(tmp_path / "one.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    sharded = make_trainer([LoRA(r=4, target_modules=["q_proj", "v_proj"])], max_steps=2,  # restores, then stops
                           strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    resumed = TokenModule(tiny_llama())
    sharded.fit(resumed, token_loader(), ckpt_path=tmp_path / "one.ckpt")  # failed: states on the wrong parameters
    state = sharded.optimizers[0].state
    got = {name: whole(state[p]["exp_avg"]) for name, p in resumed.named_parameters() if p in state}
    assert got.keys() == set(trained)
    for k, name in enumerate(trained):
        torch.testing.assert_close(got[name], saved[k]["exp_avg"], rtol=0, atol=0)


@pytest.mark.parametrize("checkpoint", ["adapter", "full"])  # a file, or a folder of the whole model's shards
def test_fsdp2_resume_with_other_settings_is_refused(lightning_launch_in_this_process, tmp_path, checkpoint):
    def fsdp2_trainer(alpha: float) -> L.Trainer:
        return make_trainer([LoRA(r=4, alpha=alpha, target_modules=["q_proj"], checkpoint=checkpoint)], max_steps=2,
                            strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))

    trainer = fsdp2_trainer(alpha=8)
    trainer.fit(TokenModule(tiny_llama()), token_loader())
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    with pytest.raises(ValueError, match=r"alpha=8 \(here 32\)"):
        fsdp2_trainer(alpha=32).fit(TokenModule(tiny_llama()), token_loader(), ckpt_path=tmp_path / "adapter.ckpt")


def test_an_fsdp2_resume_with_the_methods_in_another_order_is_refused(lightning_launch_in_this_process, tmp_path):
    def fsdp2_trainer(first: str) -> L.Trainer:
        made = {name: LoRA(r=2, target_modules=["q_proj"], adapter_name=name) for name in "ab"}
        return make_trainer([made[first], made["b" if first == "a" else "a"]], max_steps=2,
                            strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))

    trainer = fsdp2_trainer("a")
    trainer.fit(TokenModule(tiny_llama()), token_loader())
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    with pytest.raises(ValueError, match="lists its optimizer's parameters in another order than this run"):
        fsdp2_trainer("b").fit(TokenModule(tiny_llama()), token_loader(),  # was: each tensor another's moments
                               ckpt_path=tmp_path / "adapter.ckpt")


def test_ddp_evaluation_takes_each_row_once_and_a_sharded_strategy_warns_of_the_rows_it_repeats():
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn

    from lightning_peft.data.base import evaluation_loader

    def trainer(strategy, fn=TrainerFn.TESTING):
        return SimpleNamespace(world_size=2, global_rank=1, strategy=strategy, state=SimpleNamespace(fn=fn),
                               _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))

    rows = list(range(5))
    assert [batch.tolist() for batch in evaluation_loader(rows, trainer(DDPStrategy()), batch_size=3)] == [[1, 3]]
    with pytest.warns(UserWarning, match="DDPStrategy on 2 processes evaluates 1 of the 5 rows twice"):
        uneven = evaluation_loader(rows, trainer(DDPStrategy()), batch_size=2)  # unrepeated: 2 batches and 1
    assert not isinstance(uneven.sampler, DistributedSampler)  # Lightning's: as many batches on each process
    with pytest.warns(UserWarning, match="ModelParallelStrategy on 2 processes evaluates 1 of the 5 rows twice"):
        sharded = evaluation_loader(rows, trainer(ModelParallelStrategy()), batch_size=2)
    assert not isinstance(sharded.sampler, DistributedSampler)  # Lightning's goes in
    predicting = evaluation_loader(rows, trainer(ModelParallelStrategy(), TrainerFn.PREDICTING), batch_size=2)
    assert not isinstance(predicting.sampler, DistributedSampler)  # quiet: Lightning's sampler repeats no row there


def test_the_datas_seed_orders_each_processs_training_rows():
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector

    from lightning_peft.data.base import shuffled_loader

    trainer = SimpleNamespace(world_size=2, global_rank=1, fit_loop=None,
                              strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1}),
                              _accelerator_connector=SimpleNamespace(use_distributed_sampler=True, is_distributed=True))
    rows = list(range(16))
    orders = {seed: list(shuffled_loader(rows, seed, trainer, batch_size=4).sampler) for seed in (0, 1)}
    assert orders[0] != orders[1] and all(len(order) == 8 for order in orders.values())  # was: seed_everything's
    assert not _DataConnector(SimpleNamespace(_accelerator_connector=trainer._accelerator_connector)) \
        ._requires_distributed_sampler(shuffled_loader(rows, 0, trainer, batch_size=4))  # Lightning leaves it


def test_fsdp1_strategy_gets_the_wrap_policy_and_needs_original_parameters():
    module = TokenModule(injected_llama())
    flat = FSDPStrategy(use_orig_params=False)
    with pytest.raises(ValueError, match="use_orig_params=True"):
        prepare_sharding(SimpleNamespace(strategy=flat), module, adapter_checkpoints=True)
    strategy = FSDPStrategy()  # Lightning's default: use_orig_params=True
    prepare_sharding(SimpleNamespace(strategy=strategy), module, adapter_checkpoints=True)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert policy(module=module.model.model.layers[1].self_attn.v_proj.base_layer, recurse=False, nonwrapped_numel=0)


def test_a_module_holding_frozen_and_trainable_parameters_is_refused():
    model = tiny_bert()
    BitFit().inject(model)  # trains the biases beside frozen weights, in the same modules
    with pytest.raises(ValueError, match="cannot shard .* frozen .* trainable"):
        fsdp_auto_wrap_policy(model)


def test_an_unused_adapter_is_a_warning_without_ddp():
    class WithUnusedHead(TokenModule):
        def __init__(self):
            super().__init__(tiny_llama())
            self.unused_head = torch.nn.Linear(32, 4)

    with pytest.warns(UserWarning, match="unused_head.adapters.default.lora_A"):
        make_trainer([LoRA(r=4, target_modules=["q_proj", "unused_head"])], max_steps=2).fit(
            WithUnusedHead(), token_loader())


# --- gradient checkpointing with frozen embeddings ----------------------------------------------
class TinyViT(ImageModule):
    """A ViT classifier (inputs are pixel values: transformers does not enable input gradients for it)."""

    def __init__(self):
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, num_labels=3)
        super().__init__(ViTForImageClassification(config))

    def forward(self, x):
        return self.model(pixel_values=x).logits


class RecordGradients(L.Callback):
    def __init__(self):
        self.reached: dict[str, bool] = {}

    def on_after_backward(self, trainer, pl_module):
        self.reached = {n: p.grad is not None for n, p in pl_module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_frozen_embeddings_reaches_the_adapters(reentrant):
    module, record = TinyViT(), RecordGradients()
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    make_trainer([LoRA(r=4, target_modules=["q_proj", "v_proj"]), record], max_steps=1).fit(module, image_loader())
    assert record.reached and all(record.reached.values()), record.reached


# --- the GPU scripts: FSDP1 on CUDA; what a CPU can run of them ----------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs CUDA")
def test_fsdp1_wraps_adapters_apart_and_trains(tmp_path):
    script = TESTS.parent / "benchmarks" / "gpu" / "sharded_check.py"
    outputs = Launch([[sys.executable, str(script), "--strategy", "fsdp1", str(tmp_path)]], timeout=600).outputs()
    assert outputs[0].count("PASS") == 4, outputs[0][-4000:]


def test_the_sharded_check_runs_qlora_under_fsdp2_on_two_cpu_processes(tmp_path):
    """benchmarks/gpu/sharded_check.py as run_all.sh runs it on a GPU, here on two gloo processes."""
    script = TESTS.parent / "benchmarks" / "gpu" / "sharded_check.py"
    command = [sys.executable, str(script), "--strategy", "fsdp2", "--quantize", "nf4", "--device", "cpu",
               "--processes", "2", str(tmp_path)]
    output = Launch([command], MASTER_PORT=str(free_port()), timeout=300).outputs()[0]
    assert output.count("PASS") == 4 and "QLoRA (nf4) under FSDP2 on 2 cpu process(es)" in output, output[-4000:]


@pytest.mark.parametrize("arguments, message", [
    (["--strategy", "fsdp1", "--device", "cpu", "x"], "FSDP1 needs CUDA"),
    (["--strategy", "fsdp3", "x"], "invalid choice: 'fsdp3'"),
] + ([] if torch.cuda.is_available() else [(["--strategy", "fsdp2", "x"], "--device cuda needs a CUDA GPU")]))
def test_the_sharded_check_refuses_what_it_cannot_run(arguments, message):
    script = TESTS.parent / "benchmarks" / "gpu" / "sharded_check.py"
    result = subprocess.run([sys.executable, str(script), *arguments], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
