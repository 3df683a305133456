"""The Python blocks of the quick start (docs/index.md), many tasks (docs/many_tasks.md) and the method pages run.

Contract for the pages' authors:

- Every fenced ```python block of a page runs, in page order, in one namespace per page (as a
  notebook runs its cells); one test per page. A page without a block that runs fails: the quick
  start and each method page show runnable code. Shell commands go in ```bash fences, which do
  not run; a signature listing with every default is Python that runs (it constructs the object).
- The namespace starts with two names, nothing else (blocks import what they use):
  ``model``: a tiny randomly initialised transformers Llama causal LM (hidden 32, 2 blocks, a
  128-token vocabulary) whose modules are ``model.layers.N.self_attn.{q,k,v,o}_proj``,
  ``model.layers.N.mlp.{gate,up,down}_proj`` and ``lm_head``;
  ``my_lightning_module``: a LightningModule around another such model (its ``model``
  attribute), with a next-token loss and a ``train_dataloader`` of 4 batches of random tokens.
- ``lightning.Trainer`` and ``lightning.pytorch.Trainer`` are replaced by a subclass that forces
  a short run on the CPU whatever the page passes: ``max_steps=2``, one CPU device, no logger,
  checkpointing, progress bar or model summary, ``default_root_dir`` the test's tmp_path. So
  ``trainer.fit(my_lightning_module)`` in a page trains 2 steps. The working directory is that
  tmp_path, so files a block writes land there.
- A block that cannot run in a test has, on the line right before its fence,
  ``<!-- docs-test: skip (REASON) -->`` with a real reason (needs a CUDA GPU, needs the real
  SmolLM2 weights). Use it rarely; a marker without a reason, or not right before a ```python
  fence, fails the page.

A failing block is reported with its page and line numbers; tracebacks point at lines of the .md file.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import lightning.pytorch
import pytest

from conftest import TokenModule, tiny_llama, token_loader

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/index.md", "docs/many_tasks.md",
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "methods").glob("*.md"))]

OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*docs-test\b")
SKIP = re.compile(r"^\s*<!-- docs-test: skip \((?P<reason>[^()]*\S[^()]*)\) -->\s*$")
FORCED = dict(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False)


@dataclass
class Block:
    first_line: int  # 1-based line in the .md file of the block's first line of code
    last_line: int
    source: str
    skip_reason: str | None


def python_blocks(text: str, page: str) -> list[Block]:
    """The ```python blocks of a markdown text, in order; a bad skip marker is a ValueError naming its line."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = OPENING.match(lines[i])
        if MARKER.match(lines[i]):
            skip = SKIP.match(lines[i])
            following = OPENING.match(lines[i + 1]) if i + 1 < len(lines) else None
            if skip is None:
                raise ValueError(f"{page}:{i + 1}: a docs-test marker must read "
                                 f"'<!-- docs-test: skip (REASON) -->' with a reason, got {lines[i].strip()!r}")
            if following is None or following["info"].split()[:1] != ["python"]:
                raise ValueError(f"{page}:{i + 1}: a docs-test skip marker must be on the line right before a "
                                 "```python fence")
        if opening is None:
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        closing = re.compile(rf"^[ \t]*{re.escape(ticks[0])}{{{len(ticks)},}}\s*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{page}:{i + 1}: a code fence that is never closed")
        if opening["info"].split()[:1] == ["python"]:
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
            skip = SKIP.match(lines[i - 1]) if i > 0 else None
            blocks.append(Block(i + 2, end, "\n".join(body) + "\n", skip["reason"].strip() if skip else None))
        i = end + 1
    return blocks


class ExampleModule(TokenModule):
    """A plain LightningModule around a tiny Llama, with its own training batches."""

    def train_dataloader(self):
        return token_loader()


def short_trainer_class(root: Path) -> type[L.Trainer]:
    class ShortTrainer(L.Trainer):
        """A Trainer that runs 2 steps on the CPU, writing nothing outside ``root``."""

        def __init__(self, *args, **kwargs) -> None:
            kwargs.update(FORCED, default_root_dir=root)
            super().__init__(*args, **kwargs)

    return ShortTrainer


def test_blocks_are_found_with_their_lines_and_skip_markers():
    text = ("# t\n\n```python\na = 1\n```\n\n```bash\nls\n```\n\n<!-- docs-test: skip (needs a CUDA GPU) -->\n"
            "```python\nb = 2\n```\n\n- item\n\n    ```python\n    c = 3\n    ```\n")
    blocks = python_blocks(text, "t.md")
    assert [(b.first_line, b.last_line, b.source, b.skip_reason) for b in blocks] == [
        (4, 4, "a = 1\n", None), (13, 13, "b = 2\n", "needs a CUDA GPU"), (19, 19, "c = 3\n", None)]
    with pytest.raises(ValueError, match="t.md:1: a docs-test marker"):
        python_blocks("<!-- docs-test: skip -->\n```python\nx = 1\n```\n", "t.md")
    with pytest.raises(ValueError, match="t.md:1: .* right before"):
        python_blocks("<!-- docs-test: skip (no GPU) -->\n```bash\nls\n```\n", "t.md")


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    path = ROOT / page
    assert path.exists(), f"{page} does not exist"
    blocks = python_blocks(path.read_text(), page)
    runnable = [b for b in blocks if b.skip_reason is None]
    assert runnable, (f"{page} has no ```python block that runs; the quick start and every method page "
                      "show runnable code")
    trainer = short_trainer_class(tmp_path)
    monkeypatch.setattr(L, "Trainer", trainer)
    monkeypatch.setattr(lightning.pytorch, "Trainer", trainer)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__", "model": tiny_llama(), "my_lightning_module": ExampleModule(tiny_llama())}
    for block in runnable:
        # Padded so that tracebacks give the line numbers of the .md file.
        code = compile("\n" * (block.first_line - 1) + block.source, str(path), "exec")
        try:
            exec(code, namespace)
        except Exception as error:  # reported below, outside the handler, without this file's frame
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__.tb_next))
            failure = (f"{page}: the python block at line {block.first_line} (to {block.last_line}) failed: "
                       f"{type(error).__name__}: {error}\n{trace}")
        else:
            continue
        pytest.fail(failure, pytrace=False)
