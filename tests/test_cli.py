"""The lightning-peft command in a subprocess: fit then predict on tiny data, and bad input."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_bert_folder

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "was", "very", "not"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny BERT classifier folder with a word-level tokenizer, as `model:` takes it."""
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny-bert"), WORDS)


def write_data(folder: Path, name: str, rows: list[tuple[str, str]], fmt: str = "csv") -> Path:
    path = folder / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    else:
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = ["good", "great", "fine"] if positive else ["bad", "awful", "poor"]
        pick = word[int(torch.randint(0, 3, (1,), generator=g))]
        rows.append((f"the movie was very {pick}", "positive" if positive else "negative"))
    return rows


def recipe(tmp_path: Path, model_dir: Path, train: Path, test: Path | None = None, **data_extra) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 60, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning_peft.LoRA", "init_args": {
                "r": 4, "alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}}],
        },
        "model": {"class_path": "lightning_peft.tasks.SequenceClassification",
                  "init_args": {"model": str(model_dir), "learning_rate": 1e-1, "warmup_steps": 2}},
        "data": {"class_path": "lightning_peft.data.TextClassificationData",
                 "init_args": {"train_file": str(train), "batch_size": 8, "max_length": 16,
                               **({"test_file": str(test)} if test else {}), **data_extra}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_peft.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_fit_then_predict_with_string_labels(tmp_path, tiny_model_dir):
    train = write_data(tmp_path, "train", sentiment_rows(64, 0))
    test = write_data(tmp_path, "test", sentiment_rows(16, 1), fmt="jsonl")
    config = recipe(tmp_path, tiny_model_dir, train, test)

    fit = run_cli("fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "lightning-peft fit summary" in fit.stdout
    accuracy = float(fit.stdout.split("test_acc: ")[1].split()[0])
    assert accuracy >= 0.9  # the words decide the label: a trained model gets it right
    (ckpt,) = Path(tmp_path).rglob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["labels"] == ["negative", "positive"]
    assert all("adapters" in k or "classifier" in k for k in saved["state_dict"])
    adapter_dir = tmp_path / "adapter"
    assert f"adapter: {adapter_dir}" in fit.stdout
    config_file = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config_file["peft_type"] == "LORA" and config_file["r"] == 4

    texts = "the movie was very great\nthe movie was very awful\n"  # as the training texts are put
    predict = run_cli("predict", "--config", str(config), "--data.init_args.predict_file", "-",
                      "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "true", stdin=texts)
    assert predict.returncode == 0, predict.stderr[-3000:]
    lines = predict.stdout.splitlines()  # only the predictions: the progress bar and logs are on stderr
    assert [line.split("\t")[0] for line in lines] == ["positive", "negative"], predict.stdout
    assert all(0.5 <= float(line.split("\t")[1]) <= 1 for line in lines)
    assert "Predicting" in predict.stderr

    for suffix in ("csv", "jsonl"):
        out = tmp_path / f"predictions.{suffix}"
        result = run_cli("predict", "--config", str(config), "--data.init_args.predict_file", "-",
                         "--ckpt_path", str(ckpt), "--output", str(out), stdin=texts)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines() == lines
        if suffix == "csv":
            rows = list(csv.DictReader(out.open(newline="")))
        else:
            rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert list(rows[0]) == ["input", "label", "probability", "p_negative", "p_positive"]
        assert [row["input"] for row in rows] == texts.splitlines()
        assert [row["label"] for row in rows] == ["positive", "negative"]
        for row, line in zip(rows, lines, strict=True):
            p_negative, p_positive = float(row["p_negative"]), float(row["p_positive"])
            assert abs(p_negative + p_positive - 1) < 1e-6
            assert float(row["probability"]) == max(p_negative, p_positive)
            assert f"{float(row['probability']):.4f}" == line.split("\t")[1]


def test_help_lists_every_command_and_each_has_its_own(capsys):
    from lightning_peft.cli import COMMANDS, main

    result = run_cli("--help")
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(COMMANDS) == ["fit", "validate", "test", "predict", "export", "compare",
                                          "estimate"]
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        standalone = command in ("export", "compare", "estimate")  # argparse commands, not LightningCLI's
        assert f"lightning-peft {'' if standalone else '[options] '}{command}" in capsys.readouterr().out


def test_a_builtin_recipe_name_works_from_any_folder_and_a_wrong_one_lists_them(tmp_path, monkeypatch, capsys):
    from lightning_peft.cli import builtin_recipes, main

    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "lora_sentiment", "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["source"] == "movie-snippets"
    assert printed["trainer"]["callbacks"][0]["class_path"] == "lightning_peft.LoRA"

    assert {"lora_sentiment", "lora_causal_lm", "qlora_causal_lm"} <= set(builtin_recipes())
    result = run_cli("fit", "--config=lora_sentimnt")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "lightning-peft: error: --config lora_sentimnt: no such file, and no built-in recipe of that name "
        f"(built-in: {', '.join(builtin_recipes())})")


def test_fit_logs_a_csv_row_per_logged_step_and_draws_the_curves(tmp_path, tiny_model_dir):
    train = write_data(tmp_path, "train", sentiment_rows(32, 0))
    test = write_data(tmp_path, "test", sentiment_rows(8, 1))
    config = recipe(tmp_path, tiny_model_dir, train, test)
    settings = yaml.safe_load(config.read_text())
    del settings["trainer"]["logger"]  # the recipes' default: CSV under default_root_dir
    settings["trainer"].update(max_steps=6, log_every_n_steps=2, enable_progress_bar=True)
    config.write_text(yaml.safe_dump(settings))
    fit = run_cli("fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    (metrics,) = tmp_path.glob("logs/version_0/metrics.csv")
    rows = list(csv.DictReader(metrics.open(newline="")))
    assert [int(row["step"]) for row in rows if row["train_loss"]] == [1, 3, 5]  # steps 2, 4, 6, zero-based
    assert [row for row in rows if row.get("test_acc")]
    curves = metrics.with_name("curves.png")
    assert f"curves: {curves}" in fit.stdout
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    assert "Steps: 100%" in fit.stderr and "6/6" in fit.stderr  # steps against max_steps, not epochs


def test_fit_with_test_turned_off_still_summarises(tmp_path, tiny_model_dir):
    train = write_data(tmp_path, "train", sentiment_rows(16, 0))
    test = write_data(tmp_path, "test", sentiment_rows(8, 1))
    config = recipe(tmp_path, tiny_model_dir, train, test)
    fit = run_cli("fit", "--config", str(config), "--trainer.max_steps=2", "--trainer.limit_test_batches=0")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "lightning-peft fit summary" in fit.stdout and "test_acc" not in fit.stdout


def test_command_line_overrides_recipe_keys(tmp_path, tiny_model_dir):
    train = write_data(tmp_path, "train", sentiment_rows(16, 0))
    config = recipe(tmp_path, tiny_model_dir, train)
    fit = run_cli("fit", "--config", str(config), "--trainer.max_steps", "2",
                  "--trainer.callbacks.init_args.r", "2")
    assert fit.returncode == 0, fit.stderr[-3000:]
    # rank 2 on query and value (32 -> 32) in 2 blocks, plus the classifier (32 x 2 + 2)
    assert f"trainable parameters: {2 * 2 * 2 * (32 + 32) + 66:,}" in fit.stdout


@pytest.mark.parametrize("problem", ["missing_column", "empty_file", "unseen_label", "no_model", "bad_key",
                                     "bad_target", "label_order", "label_id"])
def test_bad_input_gives_one_clear_error(tmp_path, tiny_model_dir, problem):
    train = write_data(tmp_path, "train", sentiment_rows(16, 0))
    args = []
    expected = {
        "missing_column": "has no column 'label'; its columns are: text, sentiment",
        "empty_file": "has no rows",
        "unseen_label": "label 'neutral' that training never saw",
        "no_model": "is neither a built-in name",
        "bad_key": "lr_typo",
        "bad_target": "matched no module",
        "label_order": "the task's labels (positive, negative) differ from the data's (negative, positive)",
        "label_id": "train data has label 2, but the model has num_labels=2: integer labels run from 0 to 1",
    }[problem]
    if problem == "missing_column":
        train.write_text("text,sentiment\nthe movie,positive\n")
    elif problem == "empty_file":
        train.write_text("text,label\n")
    config = recipe(tmp_path, tiny_model_dir if problem != "no_model" else tmp_path / "nowhere", train,
                    write_data(tmp_path, "test", [("the plot", "neutral")]) if problem == "unseen_label" else None)
    if problem == "bad_key":
        args = ["--model.init_args.lr_typo", "1"]
    if problem == "bad_target":
        args = ["--trainer.callbacks.init_args.target_modules", "[nothing]"]
    if problem == "label_order":  # the data numbers its labels in sorted order
        args = ["--model.init_args.labels", "[positive,negative]"]
    if problem == "label_id":
        train.write_text("text,label\nthe movie,0\nthe plot,1\nthe film,2\n")
    result = run_cli("fit", "--config", str(config), *args)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(Path(tmp_path).rglob("*.ckpt"))  # nothing half-written


def test_export_adapter_and_merged_model(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lightning_peft.export import rebuild_from_checkpoint

    train = write_data(tmp_path, "train", sentiment_rows(32, 0))
    config = recipe(tmp_path, tiny_model_dir, train)
    fit = run_cli("fit", "--config", str(config), "--trainer.max_steps", "5")
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = Path(tmp_path).rglob("*.ckpt")

    trained = rebuild_from_checkpoint(ckpt)
    ids = torch.tensor([[2, 13, 11, 14, 15, 6, 3]])
    with torch.no_grad():
        expected = trained(ids)

    adapter = run_cli("export", str(ckpt), "--out", str(tmp_path / "adapter"))
    assert adapter.returncode == 0, adapter.stderr[-3000:]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-5)

    merged = run_cli("export", str(ckpt), "--out", str(tmp_path / "merged"), "--merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name or "adapters" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)

    missing = run_cli("export", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    again = run_cli("export", str(ckpt), "--out", str(tmp_path / "adapter"), "--merged")  # over the adapter export
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()  # was: left there, so loading applied it twice
    replaced = AutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(replaced(input_ids=ids).logits, expected, atol=1e-5)
    assert replaced.config.id2label == dict(enumerate(trained.labels))  # was: LABEL_0, LABEL_1
    mine = run_cli("export", str(ckpt), "--out", str(tmp_path))  # a folder of the user's own: its files stay
    assert mine.returncode == 0 and (tmp_path / "adapter_config.json").is_file(), mine.stderr[-2000:]
    assert (tmp_path / "recipe.yaml").read_text() == config.read_text()
    foreign = tmp_path / "hub-clone"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")  # a model's config that no export wrote: a loader would read both
    refused = run_cli("export", str(ckpt), "--out", str(foreign))
    assert refused.returncode == 2 and "holds config.json, which no lightning-peft export wrote" in refused.stderr
    assert [p.name for p in foreign.iterdir()] == ["config.json"]


def test_a_checkpoint_of_a_task_trained_from_python_exports(tmp_path, tiny_model_dir):
    import lightning as L
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import LoRA
    from lightning_peft.data import TextClassificationData
    from lightning_peft.tasks import SequenceClassification

    task = SequenceClassification(model=str(tiny_model_dir), learning_rate=3e-2, warmup_steps=1)
    data = TextClassificationData(train_file=str(write_data(tmp_path, "train", sentiment_rows(16, 0))), batch_size=8,
                                  max_length=16, val_fraction=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"])])
    trainer.fit(task, datamodule=data)
    trainer.save_checkpoint(tmp_path / "api.ckpt")
    exported = run_cli("export", str(tmp_path / "api.ckpt"), "--out", str(tmp_path / "adapter"))
    assert exported.returncode == 0, exported.stderr[-2000:]  # was: "does not name its LightningModule class"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    ids = torch.tensor([[2, 13, 11, 14, 15, 6, 3]])
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=ids).logits,
                                   task.eval()(ids), rtol=0, atol=1e-5)


def test_export_for_the_original_base_turns_a_pissa_adapter_into_plain_lora(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lightning_peft.export import export_checkpoint, rebuild_from_checkpoint

    config = recipe(tmp_path, tiny_model_dir, write_data(tmp_path, "train", sentiment_rows(32, 0)))
    fit = run_cli("fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.callbacks.init_args.init",
                  "pissa")
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = Path(tmp_path).rglob("*.ckpt")
    ids = torch.tensor([[2, 13, 11, 14, 15, 6, 3]])
    with torch.no_grad():
        expected = rebuild_from_checkpoint(ckpt)(ids)
    exported = run_cli("export", str(ckpt), "--out", str(tmp_path / "plain"), "--for-original-base")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["init_lora_weights"] is True
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, tmp_path / "plain").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="--for-original-base rewrites adapters .* give one or the other"):
        export_checkpoint(ckpt, tmp_path / "merged", merged=True, for_original_base=True)


def test_fit_tests_and_exports_the_best_checkpoint_when_one_is_monitored(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    config = recipe(tmp_path, tiny_model_dir, write_data(tmp_path, "train", sentiment_rows(48, 0)),
                    write_data(tmp_path, "test", sentiment_rows(16, 1)), val_fraction=0.25)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "monitor": "val_acc", "mode": "min", "save_top_k": 1, "filename": "best"}})  # the worst: not the last
    settings["trainer"].update(max_steps=8, val_check_interval=2)
    config.write_text(yaml.safe_dump(settings))
    fit = run_cli("fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    (best,) = Path(tmp_path).rglob("best.ckpt")
    assert f"checkpoint: {best} (best by val_acc; tested and exported)" in fit.stdout
    exported = run_cli("export", str(best), "--out", str(tmp_path / "from-best"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    after_fit = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    from_best = load_file(tmp_path / "from-best" / "adapter_model.safetensors")
    assert all(torch.equal(after_fit[key], from_best[key]) for key in from_best)


def test_validate_before_fit_in_one_process(tiny_model_dir, tmp_path):
    """Metric states from `validate` (inference mode) neither break nor leak into fit's validation (no_grad)."""
    import lightning as L

    from lightning_peft import LoRA
    from lightning_peft.data import TextClassificationData
    from lightning_peft.tasks import SequenceClassification

    train = write_data(tmp_path, "train", sentiment_rows(40, 0))
    task = SequenceClassification(model=str(tiny_model_dir), learning_rate=3e-2, warmup_steps=2)
    data = TextClassificationData(train_file=str(train), batch_size=8, max_length=16, val_fraction=0.2)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])])
    trainer.validate(task, datamodule=data, verbose=False)
    trainer.fit(task, datamodule=data)  # validates after each of its epochs
    during_fit = {name: float(trainer.callback_metrics[name]) for name in ("val_acc", "val_f1")}
    after = trainer.validate(task, datamodule=data, verbose=False)[0]
    assert during_fit == pytest.approx({name: after[name] for name in during_fit})  # no state carried over


def test_without_matplotlib_the_summary_says_how_to_get_the_curves(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger

    import lightning_peft.lightning.curves as curves
    from lightning_peft import cli

    logger = CSVLogger(tmp_path, name="logs")
    logger.log_metrics({"train_loss": 1.0}, step=0)
    logger.save()

    def no_matplotlib(module, extra, needed_by):
        raise ImportError(f"{needed_by} needs {module}")

    monkeypatch.setattr(curves, "import_optional", no_matplotlib)
    line = cli._curves_after_fit(SimpleNamespace(logger=logger, default_root_dir=str(tmp_path)))
    assert line == f'curves: pip install "lightning-peft[plot]" to draw {logger.experiment.metrics_file_path}'
    assert not (tmp_path / "logs" / "version_0" / "curves.png").exists()


def test_predict_with_several_adapters_routes_each_line_to_its_adapter(tmp_path, tiny_model_dir):
    """Each NAME<TAB>text line is predicted as that adapter alone predicts it ('-': the model as built)."""
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import LoRA, Selective, save_adapter

    folders = {}
    for seed, name in enumerate(["upbeat", "gloomy"]):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
        LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]).inject(model)
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 2)
        folders[name] = save_adapter(model, tmp_path / name)
    config = str(recipe(tmp_path, tiny_model_dir, write_data(tmp_path, "train", sentiment_rows(8, 0))))
    texts = ["the movie was very great", "the plot was awful", "not bad", "fine movie"]
    routes = ["upbeat", "gloomy", "-", "gloomy"]
    common = ["predict", "--config", config, "--data.init_args.predict_file", "-"]
    alone = {name: run_cli(*common, "--adapter", str(folder), stdin="\n".join(texts)).stdout.splitlines()
             for name, folder in folders.items()}
    alone["-"] = run_cli(*common, "--untrained", "true", stdin="\n".join(texts)).stdout.splitlines()
    assert alone["upbeat"] != alone["gloomy"]  # the two adapters predict differently
    out = tmp_path / "routed.csv"
    routed = run_cli(*common, "--adapters", *(f"{n}={f}" for n, f in folders.items()), "--output", str(out),
                     stdin="".join(f"{name}\t{text}\n" for name, text in zip(routes, texts, strict=True)))
    assert routed.returncode == 0, routed.stderr[-3000:]
    assert routed.stdout.splitlines() == [alone[name][i] for i, name in enumerate(routes)]
    rows = list(csv.DictReader(out.open(newline="")))
    assert [(row["adapter"], row["input"]) for row in rows] == list(zip(routes, texts, strict=True))
    wrong = run_cli(*common, "--adapters", f"upbeat={folders['upbeat']}", stdin="sunny\tthe movie\n")
    assert wrong.returncode == 2 and "line 1" in wrong.stderr and "upbeat or '-'" in wrong.stderr, wrong.stderr
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    kproj = save_adapter(Selective(modules=["key"]).inject(model), tmp_path / "kproj")  # the model's own: every row's
    shared = run_cli(*common, "--adapters", f"upbeat={folders['upbeat']}", f"kproj={kproj}",
                     stdin="upbeat\tthe movie\nkproj\tthe plot\n")  # was: upbeat's row computed with those keys
    assert shared.returncode == 2 and "rows name 'kproj', whose adapter trains the model's own parameters" in \
        shared.stderr.strip().splitlines()[-1], shared.stderr[-2000:]


def test_a_folder_of_several_tasks_adapters_is_refused_where_one_adapter_is_given(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import LoRA
    from lightning_peft.export import export_adapters

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    for name in ("t1", "t2"):  # what a multi-task fit exports: each task's adapter and head in LoRA-<task>
        LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"], adapter_name=name).inject(model)
    export_adapters(model, tmp_path / "tasks")
    config = str(recipe(tmp_path, tiny_model_dir, write_data(tmp_path, "train", sentiment_rows(8, 0))))
    common = ["predict", "--config", config, "--data.init_args.predict_file", "-"]
    for given in (["--adapter", str(tmp_path / "tasks")], ["--adapters", f"t1={tmp_path / 'tasks'}"]):
        result = run_cli(*common, *given, stdin="t1\tthe movie was great\n")  # was: every task at once, or no file
        assert result.returncode == 2, result.stderr[-2000:]
        assert ("holds adapters of several names (t1, t2: LoRA-t1, LoRA-t2), which together would all act on every "
                f"row; give one of them ({tmp_path / 'tasks' / 'LoRA-t1'}), or route each row to its own with "
                f"--adapters t1={tmp_path / 'tasks' / 'LoRA-t1'} t2={tmp_path / 'tasks' / 'LoRA-t2'}"
                in result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]
    routed = run_cli(*common, "--adapters", *(f"{n}={tmp_path / 'tasks' / f'LoRA-{n}'}" for n in ("t1", "t2")),
                     stdin="t1\tthe movie was great\nt2\tthe plot was awful\n")
    assert routed.returncode == 0 and len(routed.stdout.splitlines()) == 2, routed.stderr[-2000:]
    tasks = {name: {"train_file": str(write_data(tmp_path, f"{name}-train", sentiment_rows(8, 0))),
                    "test_file": str(write_data(tmp_path, f"{name}-test", sentiment_rows(8, 1))), "val_fraction": 0}
             for name in ("t1", "t2")}  # the multi-task data routes each row to its task's adapter: all load
    settings = yaml.safe_load(Path(config).read_text())
    settings["data"] = {"class_path": "lightning_peft.data.MultiTaskData", "init_args": {"tasks": tasks,
                                                                                        "max_length": 16}}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(settings))
    tested = run_cli("test", "--config", str(tmp_path / "tasks.yaml"), "--adapter", str(tmp_path / "tasks"))
    assert tested.returncode == 0 and "test_acc_t2" in tested.stdout + tested.stderr, tested.stderr[-2000:]
    one = run_cli("test", "--config", str(tmp_path / "tasks.yaml"), "--adapter", str(tmp_path / "tasks" / "LoRA-t1"))
    assert one.returncode == 2 and "holds the adapter 'default', and the data's tasks t1, t2 need adapters of their " \
        "names" in one.stderr.strip().splitlines()[-1], one.stderr[-2000:]  # was: per_row_adapters' error mid-test


def test_a_routed_line_without_text_is_refused_rather_than_shifting_later_rows(tmp_path):
    from lightning_peft.data.files import numbered_lines
    from lightning_peft.lightning.row_adapters import split_rows

    rows = tmp_path / "rows.txt"
    rows.write_text("upbeat\tgreat day\n\n\ngloomy\t \ngloomy\tawful plot\nupbeat\tmeh\n")
    with pytest.warns(UserWarning, match="blank line"), pytest.raises(
            ValueError, match=r"predict file, line 4: 'gloomy\\t ' has no text after its adapter name"):
        split_rows(numbered_lines(rows, keep_spaces=True), ["upbeat", "gloomy"], "predict file")  # was: line 2
    for line, what in [("cheery\tnice", "names adapter 'cheery', which --adapters does not give"),
                       ("no tab here", "does not start with an adapter name and a tab")]:  # was: the second for both
        with pytest.raises(ValueError, match=re.escape(f"predict file, line 1: {line!r} {what}; with --adapters")):
            split_rows([(1, line)], ["upbeat", "gloomy"], "predict file")


@pytest.mark.parametrize("command, args, message", [
    ("test", ["--adapters", "a=somewhere"], "--adapters is for predict, not test (give one folder with --adapter)"),
    ("validate", ["--output", "out.csv"], "--output is for predict, not validate"),
    ("validate", ["--trainer.limit_val_batches", "0"], "validate has nothing to run: the recipe sets "
                                                       "trainer.limit_val_batches to 0"),
    ("validate", ["--data.init_args.val_fraction", "0"], "validate has no data: the recipe holds out no validation"),
    ("test", ["--trainer.limit_test_batches", "0"], "test has nothing to run"),
])
def test_evaluating_with_options_that_would_be_ignored_or_nothing_to_run_is_one_line(tmp_path, tiny_model_dir, command,
                                                                                     args, message):
    train = write_data(tmp_path, "train", sentiment_rows(16, 0))
    config = recipe(tmp_path, tiny_model_dir, train, train, val_fraction=0.25)
    result = run_cli(command, "--config", str(config), "--untrained", "false", *args)
    assert result.returncode == 2  # was: exit 0, the base model's score (--adapters), or nothing printed
    assert result.stderr.strip().splitlines()[-1].startswith(f"lightning-peft: error: {message}")


def test_a_callback_setting_on_the_command_line_says_it_changed_the_last_callback(tmp_path, tiny_model_dir):
    train = write_data(tmp_path, "train", sentiment_rows(16, 0))
    config = yaml.safe_load(recipe(tmp_path, tiny_model_dir, train).read_text())
    lora = config["trainer"]["callbacks"][0]
    config["trainer"]["callbacks"] = [{**lora, "init_args": {**lora["init_args"], "adapter_name": name,
                                                             "modules_to_save": None}} for name in ("a", "b")]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    fit = run_cli("fit", "--config", str(tmp_path / "two.yaml"), "--trainer.max_steps", "1",
                  "--trainer.callbacks.init_args.r", "2")
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "--trainer.callbacks.init_args.r changes the last of the recipe's 2 callbacks (LoRA[b]) only" in fit.stderr


def test_validate_runs_on_a_recipes_own_validation_file(tmp_path, tiny_model_dir):
    train = write_data(tmp_path, "train", sentiment_rows(16, 0))
    config = recipe(tmp_path, tiny_model_dir, train, val_fraction=0, val_file=str(train))
    result = run_cli("validate", "--config", str(config), "--untrained", "false")
    assert result.returncode == 0 and "val_acc" in result.stdout, result.stderr[-2000:]


def test_a_finished_fit_under_slurm_tests_and_exports_its_own_weights_not_the_requeue_checkpoint(
        tmp_path, tiny_model_dir, monkeypatch):
    train = write_data(tmp_path, "train", sentiment_rows(64, 0))
    config = recipe(tmp_path, tiny_model_dir, train, write_data(tmp_path, "test", sentiment_rows(16, 1)))
    preempted = run_cli("fit", "--config", str(config), "--trainer.max_steps=2")
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    requeue = tmp_path / "hpc_ckpt_1.ckpt"  # what Lightning writes when SLURM signals the end of the time limit
    shutil.copy(next(tmp_path.glob("checkpoints/*.ckpt")), requeue)
    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "7",
                        "SLURM_JOB_NAME": "lora", "SLURM_NODELIST": "127.0.0.1", "SLURM_NODEID": "0",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    requeued = run_cli("fit", "--config", str(config), "--trainer.max_steps=12")
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "Restored all states from the checkpoint" in requeued.stdout + requeued.stderr  # it resumed from it
    assert not requeue.exists() and (tmp_path / "hpc-ckpt-1.resumed.ckpt").is_file()
    from types import SimpleNamespace

    from lightning_peft.cli import _retire_requeue_checkpoints

    requeue.write_bytes(b"a later job's")  # a later requeued run in the same folder keeps the earlier file
    _retire_requeue_checkpoints(SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True,
                                                strategy=SimpleNamespace(barrier=lambda *_: None)))
    assert (tmp_path / "hpc-ckpt-1.resumed-1.ckpt").read_bytes() == b"a later job's"
    stale = torch.load(tmp_path / "hpc-ckpt-1.resumed.ckpt", weights_only=True)["state_dict"]
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = next(k for k in exported if "layer.0.attention.self.query.lora_B" in k)
    stale_key = next(k for k in stale if "layer.0.attention.self.query" in k and k.endswith("lora_B"))
    assert not torch.equal(exported[key], stale[stale_key])  # was: the test after fit loaded the requeue checkpoint


def summary_value(stdout: str, key: str) -> str:
    """A line's value in the fit summary (``checkpoint: PATH`` gives PATH)."""
    return next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.strip().startswith(f"{key}: "))


def test_a_fit_ending_between_validations_checkpoints_the_weights_it_tests_and_exports(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    config = recipe(tmp_path, tiny_model_dir, write_data(tmp_path, "train", sentiment_rows(40, 0)))
    fit = run_cli("fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.val_check_interval", "2")
    assert fit.returncode == 0, fit.stderr[-3000:]
    path = Path(summary_value(fit.stdout, "checkpoint"))
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 3, path  # was: step 2's, the last validation's, named as the run's
    assert path.name == "epoch=0-step=3.ckpt" and len(list(path.parent.glob("*.ckpt"))) == 1  # saved inside the epoch
    assert checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0  # was: the epoch done
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved = {k: v for k, v in checkpoint["state_dict"].items() if k.endswith("query.adapters.default.lora_B")}
    names = {k: "base_model.model." + k.removeprefix("model.").replace("adapters.default.", "") + ".weight"
             for k in saved}
    assert saved and all(torch.equal(v, exported[names[k]]) for k, v in saved.items())


def test_a_resume_with_more_steps_goes_on_along_the_longer_schedule_with_a_warning(tmp_path, tiny_model_dir):
    import lightning as L

    from lightning_peft import LoRA
    from lightning_peft.data import TextClassificationData
    from lightning_peft.tasks import SequenceClassification

    from conftest import make_trainer

    train = write_data(tmp_path, "train", sentiment_rows(40, 0))

    class Rates(L.Callback):
        def __init__(self):
            self.rates = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.rates.append(optimizer.param_groups[0]["lr"])

    def fit(max_steps, ckpt_path=None):
        torch.manual_seed(0)
        module = SequenceClassification(str(tiny_model_dir), learning_rate=3e-2, warmup_steps=2)
        data = TextClassificationData(train_file=str(train), batch_size=8, max_length=16, val_fraction=0)
        rates = Rates()
        trainer = make_trainer([LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"]), rates],
                               max_steps=max_steps)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return trainer, rates.rates

    first, _ = fit(5)
    first.save_checkpoint(tmp_path / "five.ckpt")
    with pytest.warns(UserWarning, match="trained on a learning-rate schedule of 5 optimizer steps, and this fit "
                                         "has 10: from step 5 on, the rate follows this fit's schedule"):
        _, resumed = fit(10, tmp_path / "five.ckpt")
    _, straight = fit(10)
    assert resumed == pytest.approx(straight[5:])  # was: its first step at 0, the five-step schedule's end


def test_one_callback_given_alone_is_a_list_of_one(tmp_path, tiny_model_dir):
    config = recipe(tmp_path, tiny_model_dir, write_data(tmp_path, "train", sentiment_rows(16, 0)))
    fit = run_cli("fit", "--config", str(config), "--trainer.callbacks", "lightning_peft.IA3",
                  "--trainer.max_steps", "1")
    assert fit.returncode == 0, fit.stderr[-2000:]  # was: TypeError: 'IA3' object is not iterable


def test_a_resume_that_would_not_do_what_it_says_is_refused(tmp_path, tiny_model_dir):
    config = recipe(tmp_path, tiny_model_dir, write_data(tmp_path, "train", sentiment_rows(40, 0)))
    (tmp_path / "overlay.yaml").write_text("model:\n  init_args:\n    learning_rate: 0.5\n")
    first = run_cli("fit", "--config", str(config), "--trainer.max_steps", "2", "--data.init_args.val_fraction", "0")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = summary_value(first.stdout, "checkpoint")
    (tmp_path / "more").mkdir()
    for change, message in [  # was: each resumed with the checkpoint's settings, or rows repeated and skipped
        (["--model.init_args.learning_rate", "0.5"], "was trained with learning_rate=0.1 (here 0.5): a resume"),
        (["--config", str(tmp_path / "overlay.yaml")], "was trained with learning_rate=0.1 (here 0.5)"),
        (["--data.init_args.batch_size", "4"], "saved inside an epoch of batch_size 8, and this fit's batch_size "
                                               "is 4"),
        (["--data.init_args.batch_size", "40"], "and this fit's batch_size is 40"),  # was: 2 done of 1, a new epoch
        (["--data.init_args.train_file", str(write_data(tmp_path / "more", "train", sentiment_rows(64, 0)))],
         "saved inside an epoch of 5 batches a process, and this fit's epoch has 8 (other data"),
    ]:
        resumed = run_cli("fit", "--config", str(config), "--trainer.max_steps", "4", "--data.init_args.val_fraction",
                          "0", "--ckpt_path", ckpt, *change)
        assert resumed.returncode == 2 and message in resumed.stderr.strip().splitlines()[-1], resumed.stderr[-2000:]
    settings = yaml.safe_load(config.read_text())  # a recipe that leaves the rate out takes the checkpoint's
    del settings["model"]["init_args"]["learning_rate"], settings["model"]["init_args"]["warmup_steps"]
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(settings))
    bare = run_cli("fit", "--config", str(tmp_path / "bare.yaml"), "--trainer.max_steps", "3",
                   "--data.init_args.val_fraction", "0", "--ckpt_path", ckpt)
    assert bare.returncode == 0, bare.stderr[-2000:]


def test_a_typo_in_a_second_config_file_names_the_setting(tmp_path, tiny_model_dir):
    config = recipe(tmp_path, tiny_model_dir, write_data(tmp_path, "train", sentiment_rows(16, 0)))
    (tmp_path / "overlay.yaml").write_text("model:\n  init_args:\n    learning_rat: 0.1\n")
    result = run_cli("fit", "--config", str(config), "--config", str(tmp_path / "overlay.yaml"))
    assert result.returncode == 2  # was: "lightning-peft: error: 'class_path'"
    assert "does not take 'learning_rat'; did you mean 'learning_rate'?" in result.stderr.strip().splitlines()[-1]


def test_the_adapter_folder_of_a_fit_with_two_methods_tests_as_the_fit_did(tmp_path, tiny_model_dir):
    train = write_data(tmp_path, "train", sentiment_rows(32, 0))
    config = recipe(tmp_path, tiny_model_dir, train, write_data(tmp_path, "test", sentiment_rows(16, 1)))
    fit = run_cli("fit", "--config", str(config), "--trainer.max_steps", "4",
                  "--trainer.callbacks+=lightning_peft.BitFit")
    assert fit.returncode == 0, fit.stderr[-2000:]
    folder = Path(summary_value(fit.stdout, "adapter"))
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["BitFit-default", "LoRA-default"]
    tested = run_cli("test", "--config", str(config), "--adapter", str(folder))
    assert tested.returncode == 0, tested.stderr[-2000:]  # was: "adapter_config.json does not exist"
    accuracy = re.search(r"test_acc\s*│\s*([0-9.]+)", tested.stdout)
    assert accuracy and float(accuracy[1]) == pytest.approx(float(summary_value(fit.stdout, "test_acc")), abs=1e-4)


def test_a_classifier_folder_with_a_head_of_other_classes_gets_a_new_head(tmp_path, tiny_model_dir):
    from lightning_peft.tasks import SequenceClassification

    task = SequenceClassification(model=str(tiny_model_dir), labels=["a", "b", "c"])  # the folder's head has 2
    task.configure_model()  # was: transformers' RuntimeError about ignore_mismatched_sizes
    assert task.model.classifier.out_features == 3 and task.model.config.num_labels == 3


def test_config_values_a_folder_inline_yaml_and_settings_before_the_recipe(tmp_path, monkeypatch):
    from lightning_peft.builtin_recipes import RECIPES, recipe_path
    from lightning_peft.cli import _warn_of_settings_before_a_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lora_sentiment").mkdir()  # was: "Path is not a file" for a folder of the recipe's name here
    assert recipe_path("lora_sentiment") == str(RECIPES / "lora_sentiment.yaml")
    for inline in ("trainer: {max_steps: 3}", "{trainer: {max_steps: 3}}"):  # was: "no such file"
        assert recipe_path(inline) == inline
    with pytest.warns(UserWarning, match=r"--trainer.max_steps come\(s\) before --config, so the recipe's own value "
                                         "wins"):  # was: silently 300, the recipe's
        _warn_of_settings_before_a_recipe(["fit", "--trainer.max_steps=2", "--config", "lora_sentiment"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_of_settings_before_a_recipe(["fit", "--config", "lora_sentiment", "--trainer.max_steps=2"])


def test_predictions_piped_into_a_reader_that_stops_early_go_on_quietly(tmp_path):
    script = ("import sys\nfrom lightning_peft.lightning.predictions import print_line\n"
              "for i in range(100_000):\n    print_line(f'row {i}')\nopen(sys.argv[1], 'w').write('went on')\n")
    done = subprocess.run(f"{sys.executable} -c \"$SCRIPT\" {tmp_path / 'done'} | head -1", shell=True, text=True,
                          capture_output=True, env={**os.environ, "SCRIPT": script}, timeout=120)
    assert done.stdout == "row 0\n" and "Error" not in done.stderr, done.stderr  # was: BrokenPipeError, exit 2
    assert (tmp_path / "done").read_text() == "went on"  # as predict goes on to write its --output table
