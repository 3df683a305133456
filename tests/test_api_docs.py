"""Every public name has a docstring the API reference renders whole: a summary, each argument, an example."""

import inspect

import griffe
import pytest

import lightning_peft
import lightning_peft.data
import lightning_peft.tasks

PUBLIC = [f"lightning_peft.{name}" for name in lightning_peft.__all__] + [
    f"lightning_peft.{package}.{name}" for package, module in (("tasks", lightning_peft.tasks),
                                                               ("data", lightning_peft.data))
    for name in module.__all__]


@pytest.fixture(scope="module")
def package() -> griffe.Module:
    return griffe.load("lightning_peft", docstring_parser="google", resolve_aliases=True)


def documented_sections(obj: griffe.Object) -> dict[str, list]:
    """The docstring's sections as griffe parses them for the site (its warnings go to the log)."""
    found: dict[str, list] = {}
    for section in obj.docstring.parsed:
        found.setdefault(section.kind.value, []).extend(section.value if isinstance(section.value, list)
                                                        else [section.value])
    return found


def signature_parameters(path: str) -> list[str]:
    """The parameters a user passes: the function's, or a class's ``__init__``'s, without self."""
    module, _, name = path.rpartition(".")
    obj = getattr(__import__(module, fromlist=[name]), name)
    target = obj.__init__ if inspect.isclass(obj) else obj
    return [p for p in inspect.signature(target).parameters if p != "self"]


@pytest.mark.parametrize("path", PUBLIC)
def test_public_name_documents_summary_every_argument_and_an_example(package, path, caplog):
    obj = package[path.removeprefix("lightning_peft.")]
    assert obj.docstring is not None, f"{path} has no docstring"
    with caplog.at_level("WARNING", logger="griffe"):
        sections = documented_sections(obj)
    assert not caplog.records, f"{path}: griffe: {[r.getMessage() for r in caplog.records]}"
    summary = obj.docstring.value.strip().splitlines()[0]
    assert summary.endswith("."), f"{path}: the summary line should be one sentence: {summary!r}"
    documented = [p.name.lstrip("*") for p in sections.get("parameters", [])]
    assert documented == signature_parameters(path), f"{path}: Args documents {documented}"
    assert sections.get("examples"), f"{path} has no Examples section"
