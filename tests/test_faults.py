"""Faults while saving: kill -9 mid-save, a full disk, leftovers, file modes.

The kill test forks training processes (torch already imported, so each run costs well under a
second) that save a checkpoint every step and kill themselves with SIGKILL at a random byte of a
random save; each run resumes from the last checkpoint the previous one left.
"""

from __future__ import annotations

import errno
import hashlib
import io
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft.core.adapter_files as adapter_files
from lightning_peft import LoRA, save_adapter
from lightning_peft.core.files import current_umask, remove_stale_temporaries
from lightning_peft.lightning.checkpointing import read_checkpoint

from conftest import (
    TokenModule,
    fail_half_way_with_enospc,
    make_trainer,
    tiny_llama,
    token_loader,
    trainable_tensors,
)

EPOCHS = 40  # one step each: a checkpoint after every step
KILLS = 20


def train(folder: Path, kill_at: int | None = None, fraction: float = 0.0) -> None:
    """Train to EPOCHS from ``folder/last.ckpt`` if there is one; with ``kill_at``, SIGKILL during that save."""
    if kill_at is not None:
        real_save, saves = torch.save, [0]

        def save_then_die(obj, f, *args, **kwargs):
            saves[0] += str(f).endswith(".tmp")  # a checkpoint being written
            if saves[0] < kill_at:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer)
            with open(f, "wb") as out:  # the temporary file: part of it written, as a kill leaves it
                out.write(buffer.getvalue()[:int(len(buffer.getvalue()) * fraction)])
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_then_die
    torch.manual_seed(0)
    module = TokenModule(tiny_llama())
    checkpoints = ModelCheckpoint(dirpath=folder, save_last=True, every_n_epochs=1)  # two saves an epoch
    trainer = make_trainer([LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), checkpoints],
                           max_epochs=EPOCHS, max_steps=-1, enable_checkpointing=True)
    last = folder / "last.ckpt"
    trainer.fit(module, token_loader(n=4, batch=4), ckpt_path=last if last.exists() else None)
    torch.save(trainable_tensors(module), folder / "final.pt")


def run_forked(folder: Path, kill_at: int | None = None, fraction: float = 0.0) -> int:
    def target() -> None:
        try:
            train(folder, kill_at, fraction)
        except BaseException:
            traceback.print_exc()
            os._exit(1)

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    process.join(timeout=300)
    return process.exitcode


@pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL are POSIX")
def test_killed_during_saves_twenty_times_resumes_to_the_uninterrupted_adapter(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_forked(straight) == 0
    rng = random.Random(0)
    for _ in range(KILLS):
        kill_at, fraction = rng.randint(1, 3), rng.random()
        assert run_forked(killed, kill_at, fraction) == -signal.SIGKILL
        temporaries = list(killed.glob(".*.tmp"))
        assert len(temporaries) <= 1, temporaries  # at most the one this kill left: older ones were removed
        if (killed / "last.ckpt").exists():
            checkpoint = read_checkpoint(killed / "last.ckpt")  # weights_only=True, checksum checked
            assert checkpoint["lightning_peft"]["adapter_only"]
    assert run_forked(killed) == 0
    assert not list(killed.glob(".*.tmp"))
    expected = torch.load(straight / "final.pt", weights_only=True)
    got = torch.load(killed / "final.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# --- a full disk ---------------------------------------------------------------------------------------
def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_a_full_disk_leaves_the_previous_adapter_and_says_so_in_one_line(tmp_path, monkeypatch, failing):
    torch.manual_seed(0)
    model = LoRA(r=4, target_modules=["q_proj"]).inject(tiny_llama())
    save_adapter(model, tmp_path / "adapter")
    before = digests(tmp_path / "adapter")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)  # a new adapter to save over the old one
    if failing == "weights":
        failing_writer = fail_half_way_with_enospc(adapter_files.write_safetensors)
        monkeypatch.setattr(adapter_files, "write_safetensors", failing_writer)
    else:  # the second file: the first is written by then, and must not be renamed in alone
        real_write_text = Path.write_text

        def write_text(path, data, *args, **kwargs):
            real_write_text(path, data[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError) as info:
        save_adapter(model, tmp_path / "adapter")
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert digests(tmp_path / "adapter") == before  # both files: the config was not replaced alone either
    assert not list((tmp_path / "adapter").glob(".*"))


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    module = TokenModule(tiny_llama())
    trainer = make_trainer([LoRA(r=4, target_modules=["q_proj"])], max_steps=1)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    before = digests(tmp_path)
    monkeypatch.setattr(torch, "save", fail_half_way_with_enospc(torch.save))
    with pytest.raises(OSError, match="No space left on device"):
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert digests(tmp_path) == before


# --- leftovers and modes -------------------------------------------------------------------------------
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_next_save_removes_temporaries_of_killed_writers_only(tmp_path):
    from lightning_peft.core.files import _host

    folder = tmp_path / "adapter"
    folder.mkdir()
    stale = folder / f".adapter_model.safetensors.{_host()}-{dead_pid()}.x1y2.tmp"
    live = folder / f".adapter_model.safetensors.{_host()}-{os.getpid()}.a1b2.tmp"  # a write in progress
    elsewhere = folder / f".adapter_model.safetensors.otherhost-{dead_pid()}.c3d4.tmp"  # another node's
    foreign = folder / ".notes.tmp"  # not ours
    for path in (stale, live, elsewhere, foreign):
        path.write_bytes(b"partial")
    save_adapter(LoRA(r=2, target_modules=["q_proj"]).inject(tiny_llama()), folder)
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and foreign.exists()
    assert remove_stale_temporaries(folder) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        model = LoRA(r=2, target_modules=["q_proj"]).inject(tiny_llama())
        save_adapter(model, tmp_path / "adapter")
        trainer = make_trainer([LoRA(r=2, target_modules=["q_proj"])], max_steps=1)
        trainer.fit(TokenModule(tiny_llama()), token_loader())
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    for path in [*(tmp_path / "adapter").iterdir(), tmp_path / "last.ckpt"]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(path.stat().st_mode))


@pytest.mark.parametrize("raised, words", [
    (PermissionError(13, "Permission denied"), ["last.ckpt cannot be read: permission denied"]),
    (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory, and then a long "
                  "tail that names the actual archive member and offset at which reading stopped: data/7 at 123456"),
     ["last.ckpt cannot be read", "data/7 at 123456"]),  # the reason whole, not cut short
])
def test_an_unreadable_checkpoint_is_one_error_that_names_the_file_and_the_whole_reason(tmp_path, monkeypatch,
                                                                                         raised, words):
    def failing_load(*args, **kwargs):
        raise raised

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(ValueError) as info:
        read_checkpoint(tmp_path / "last.ckpt")
    for word in words:
        assert word in str(info.value)
