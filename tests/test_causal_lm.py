"""Causal-LM task and data: packing, prompt masking, LoRA tuning, the CLI (fit then predict), and the Austen corpus."""

import json
import lzma
import math
import shutil
import subprocess
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from test_cli import run_cli

from lightning_peft import LoRA, PromptTuning, assets
from lightning_peft.assets import AssetError, austen_text
from lightning_peft.data import CausalLMData
from lightning_peft.tasks import CausalLM

from conftest import make_trainer

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
VOCAB = ["<pad>", "<unk>", "</s>", *WORDS]
PAD, EOS = 0, 2
ID = {word: i for i, word in enumerate(VOCAB)}
COUNTING = "".join(" ".join(WORDS) + "\n" for _ in range(40))  # 400 words, each always followed by the same one
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def _one_thread_in_subprocesses(monkeypatch):
    """The CLI runs here take torch's thread count from this: one runs a tiny model fastest, above all on a busy CPU."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def ids(text: str) -> list[int]:
    return [ID[word] for word in text.split()]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a word-level tokenizer (pad and end tokens), as `model:` takes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    backend = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
                         initializer_range=0.2)  # at 0.02 the frozen head caps the logits: loss >= 2.0 for LoRA
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def test_packing_makes_whole_blocks_and_holds_out_the_last_lines(tmp_path, tokenizer):
    text = tmp_path / "counting.txt"
    text.write_text("".join(" ".join(WORDS) + "\n" for _ in range(5)))  # 50 tokens, then the end token
    data = CausalLMData(test_file=str(text), block_size=8, batch_size=4, tokenizer=tokenizer)
    data.setup("test")
    loaded = list(data.test_dataloader())
    assert [tuple(batch["input_ids"].shape) for batch in loaded] == [(4, 8), (2, 8)]  # 51 // 8 blocks, 3 dropped
    stream = torch.cat([batch["input_ids"] for batch in loaded]).flatten().tolist()
    assert stream == ids(" ".join(WORDS * 5))[:48]
    assert all(torch.equal(batch["labels"], batch["input_ids"]) for batch in loaded)
    assert all(bool(batch["attention_mask"].all()) for batch in loaded)

    lines = [f"{WORDS[i]} {WORDS[i]}\n" for i in range(10)]
    text.write_text("".join(lines))
    data = CausalLMData(train_file=str(text), val_fraction=0.2, block_size=2, tokenizer=tokenizer)
    data.setup("fit")
    assert (data.splits["train"], data.splits["val"]) == ("".join(lines[:8]), "".join(lines[8:]))


def test_pairs_carry_loss_on_the_response_only(tmp_path, tokenizer):
    pairs = tmp_path / "pairs.jsonl"
    rows = [("one two three", "four five"), ("six", "seven"), ("one", " ".join(WORDS[1:]))]
    pairs.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    data = CausalLMData(test_file=str(pairs), block_size=8, batch_size=3, tokenizer=tokenizer)
    data.setup("test")
    (batch,) = list(data.test_dataloader())
    x = -100
    assert batch["input_ids"].tolist() == [
        ids("one two three four five") + [EOS, PAD, PAD],
        ids("six seven") + [EOS, PAD, PAD, PAD, PAD, PAD],
        ids("one two three four five six seven eight"),  # cut at block_size: no end token
    ]
    assert batch["labels"].tolist() == [
        [x, x, x, *ids("four five"), EOS, x, x],
        [x, *ids("seven"), EOS, x, x, x, x, x],
        [x, *ids("two three four five six seven eight")],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0] * 2, [1] * 3 + [0] * 5, [1] * 8]


def test_prompts_to_predict_are_left_padded(tmp_path, tokenizer):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\n\nthree\n")
    data = CausalLMData(predict_file=str(prompts), tokenizer=tokenizer)
    data.setup("predict")
    (batch,) = list(data.predict_dataloader())
    assert batch["input_ids"].tolist() == [ids("one two"), [PAD, *ids("three")]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_prompts_to_predict_keep_the_spaces_they_were_trained_with(tmp_path, tokenizer):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "Q: one two\nA: ", "response": "three"}) + "\n")
    data = CausalLMData(predict_file=str(tmp_path / "pairs.jsonl"), tokenizer=tokenizer)
    data.setup("predict")
    data.predict_dataloader()
    assert data.predict_texts == ["Q: one two\nA: "]  # as training reads the pair; was "Q: one two\nA:"


def test_chat_template_wraps_prompts_when_asked(tmp_path, tiny_lm_dir):
    from transformers import AutoTokenizer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        CausalLMData(predict_file=str(prompts), tokenizer=tokenizer, chat_template=True).setup("predict")
    tokenizer.chat_template = ("{% for m in messages %}{{ m.content }} {% endfor %}"
                               "{% if add_generation_prompt %}ten{% endif %}")
    data = CausalLMData(predict_file=str(prompts), tokenizer=tokenizer, chat_template=True)
    data.setup("predict")
    (batch,) = list(data.predict_dataloader())
    assert batch["input_ids"].tolist() == [ids("one two ten")]


def test_lora_lowers_the_validation_loss(tmp_path, tiny_lm_dir):
    text = tmp_path / "counting.txt"
    text.write_text(COUNTING)
    model = CausalLM(model=str(tiny_lm_dir), learning_rate=3e-2, warmup_steps=0)
    data = CausalLMData(train_file=str(text), block_size=16, batch_size=4, val_fraction=0.2)
    trainer = make_trainer([LoRA(r=4, alpha=8, target_modules=ATTENTION)], max_steps=30)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]
    trainer.fit(model, datamodule=data)
    after = trainer.validate(model, datamodule=data, verbose=False)[0]
    assert after["val_loss"] < 0.5 * before["val_loss"]
    assert after["val_ppl"] == pytest.approx(torch.exp(torch.tensor(after["val_loss"])).item(), rel=1e-4)
    assert all("lora" in name for name, p in model.named_parameters() if p.requires_grad)


def lm_recipe(tmp_path: Path, model_dir: Path, train: Path, **data_extra) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 40, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning_peft.LoRA",
                           "init_args": {"r": 4, "alpha": 8, "target_modules": ATTENTION}}],
        },
        "model": {"class_path": "lightning_peft.tasks.CausalLM",
                  "init_args": {"model": str(model_dir), "learning_rate": 3e-2, "warmup_steps": 0,
                                "max_new_tokens": 4}},
        "data": {"class_path": "lightning_peft.data.CausalLMData",
                 "init_args": {"train_file": str(train), "block_size": 16, "batch_size": 4, **data_extra}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_loss_logged_over_a_split_is_its_tokens_mean_whatever_the_batches(tmp_path, tiny_lm_dir):
    pairs = tmp_path / "pairs.jsonl"
    rows = [("one", "two three four five six"), ("seven eight nine", "ten"), ("two", "three four")]
    pairs.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    model = CausalLM(model=str(tiny_lm_dir))
    results = [make_trainer([]).validate(model, datamodule=CausalLMData(
        train_file=str(pairs), val_file=str(pairs), batch_size=batch), verbose=False)[0] for batch in (1, 3)]
    for result in results:  # was: a mean of batch means, which moved with the batch size
        assert result["val_loss"] == pytest.approx(math.log(result["val_ppl"]), rel=1e-5)
    assert results[0]["val_loss"] == pytest.approx(results[1]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("callbacks, precision", [([PromptTuning(num_virtual_tokens=3)], "32-true"),
                                                 ([], "bf16-true")], ids=["prompt-tuning", "bf16"])
def test_loss_and_perplexity_are_over_the_same_tokens_in_float32(tmp_path, tiny_lm_dir, callbacks, precision):
    text = tmp_path / "counting.txt"
    text.write_text(COUNTING)
    data = CausalLMData(train_file=str(text), block_size=16, batch_size=4, val_fraction=0.2)
    result = make_trainer(callbacks, precision=precision).validate(CausalLM(model=str(tiny_lm_dir)), datamodule=data,
                                                                   verbose=False)[0]
    # was: the loss also counted the first token (after the prompt), the perplexity was taken in bf16
    assert result["val_loss"] == pytest.approx(math.log(result["val_ppl"]), rel=1e-6)


def test_cli_fit_then_predict_generates(tmp_path, tiny_lm_dir):
    train = tmp_path / "counting.txt"
    train.write_text(COUNTING)
    config = lm_recipe(tmp_path, tiny_lm_dir, train, val_fraction=0.2)
    fit = run_cli("fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "lightning-peft fit summary" in fit.stdout
    (ckpt,) = tmp_path.rglob("*.ckpt")

    out = tmp_path / "generated.jsonl"
    predict = run_cli("predict", "--config", str(config), "--data.init_args.predict_file", "-",
                      "--ckpt_path", str(ckpt), "--output", str(out), stdin="three four\nseven\n")
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert predict.stdout.splitlines() == ["five six seven eight", "eight nine ten one"]  # only the predictions
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"input": "three four", "generated": "five six seven eight"},
                    {"input": "seven", "generated": "eight nine ten one"}]
    shorter = run_cli("predict", "--config", str(config), "--data.init_args.predict_file", "-", "--ckpt_path",
                      str(ckpt), "--model.init_args.max_new_tokens", "2", stdin="three four\n")
    assert shorter.stdout.splitlines() == ["five six"]  # the command line wins (was: the checkpoint's 4 tokens)


def test_predict_with_prompt_adapters_of_different_lengths_generates_one_row_at_a_time(tmp_path, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from lightning_peft import PromptTuning, save_adapter

    folders = {}
    for seed, (name, length) in enumerate((("short", 2), ("long", 3))):
        model = PromptTuning(num_virtual_tokens=length).inject(AutoModelForCausalLM.from_pretrained(tiny_lm_dir))
        torch.manual_seed(seed)
        with torch.no_grad():
            model.prompt_tuning.adapters["default"].prompt.normal_(std=3)
        folders[name] = save_adapter(model, tmp_path / name)
    train = tmp_path / "counting.txt"
    train.write_text(COUNTING)
    common = ["predict", "--config", str(lm_recipe(tmp_path, tiny_lm_dir, train)), "--data.init_args.predict_file", "-"]
    texts, routes = ["three four ", "seven", "one two", "five"], ["short", "-", "long", "short"]
    routed = run_cli(*common, "--adapters", *(f"{n}={f}" for n, f in folders.items()), "--output",
                     str(tmp_path / "routed.jsonl"),
                     stdin="".join(f"{name}\t{text}\n" for name, text in zip(routes, texts, strict=True)))
    assert routed.returncode == 0, routed.stderr[-3000:]
    assert "predict generates one row at a time: the rows' soft prompts have different lengths (0, 2, 3)" in \
        routed.stderr
    inputs = [json.loads(line)["input"] for line in (tmp_path / "routed.jsonl").read_text().splitlines()]
    assert inputs == texts  # the prompts' spaces kept, as --adapter keeps them (was: "three four")
    short = run_cli(*common, "--adapter", str(folders["short"]), stdin="three four \nfive\n").stdout.splitlines()
    assert [line for line, name in zip(routed.stdout.splitlines(), routes, strict=True) if name == "short"] == short


@pytest.mark.parametrize("problem", ["missing_column", "empty_file", "no_model", "one_line", "one_pair",
                                     "source_and_files"])
def test_bad_input_gives_one_clear_error(tmp_path, tiny_lm_dir, problem):
    train = tmp_path / ("pairs.jsonl" if problem in ("missing_column", "one_pair") else "counting.txt")
    train.write_text({"missing_column": json.dumps({"prompt": "one", "answer": "two"}) + "\n",
                      "one_pair": json.dumps({"prompt": "one", "response": "two"}) + "\n",
                      "empty_file": "\n", "one_line": "one two three\n"}.get(problem, COUNTING))
    expected = {"missing_column": "has no column 'response'; its columns are: prompt, answer",
                "empty_file": "is empty", "no_model": "is neither a built-in name",
                "one_line": "the training data has 1 line: too few to hold out val_fraction",
                "one_pair": "the training data has 1 pair: too few to hold out val_fraction",
                "source_and_files": f"give a built-in source or data files, not both: source='austen' would be "
                                    f"read and train_file={train} ignored"}[problem]
    config = lm_recipe(tmp_path, tiny_lm_dir if problem != "no_model" else tmp_path / "nowhere", train)
    extra = ["--data.init_args.source=austen"] if problem == "source_and_files" else []
    result = run_cli("fit", "--config", str(config), *extra)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing half-written


def test_austen_text_comes_from_debian(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path))
    if shutil.which("apt-get") is None:  # no apt here: the error says what to run instead
        with pytest.raises(AssetError, match="apt-get download r-cran-janeaustenr"):
            austen_text()
        return
    text = austen_text()
    assert (text.count("\n"), len(text)) == (73_422, 4_025_028)
    assert text.startswith("SENSE AND SENSIBILITY\n") and text.endswith("Finis\n")
    assert "her £20,000" in text  # the one non-ASCII character, decoded
    assert sorted(path.name for path in tmp_path.iterdir()) == ["austen.txt", "austen.txt.lock"]
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)  # the cache needs no apt-get
    assert austen_text() == text


def test_austen_without_apt_says_what_to_run_then_takes_the_deb_put_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path))
    has_apt = shutil.which("apt-get") is not None
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(AssetError) as error:
        austen_text()
    assert "apt-get update && apt-get download r-cran-janeaustenr" in str(error.value)
    assert str(tmp_path) in str(error.value)
    assert not (tmp_path / "austen.txt").exists()
    if has_apt:  # follow the message by hand: the .deb put in the cache is used offline
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp_path, capture_output=True, check=True)
        assert austen_text().count("\n") == 73_422


def test_rdb_entries_unpack_in_every_compression():
    value = b"X\n" + bytes(range(256)) * 4
    size = len(value).to_bytes(4, "big")
    xz = lzma.compress(value, lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    assert assets._rdb_value(size + zlib.compress(value), zlib_only=True) == value
    assert assets._rdb_value(size + b"Z" + xz, zlib_only=False) == value
    assert assets._rdb_value(size + b"0" + value, zlib_only=False) == value
    with pytest.raises(AssetError, match="unpacked to"):
        assets._rdb_value((len(value) + 1).to_bytes(4, "big") + zlib.compress(value), zlib_only=True)


def test_a_model_of_learned_positions_refuses_prompts_and_continuations_longer_than_them(tmp_path, tiny_lm_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_lm_dir / name).exists():
            shutil.copy(tiny_lm_dir / name, tmp_path / name)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=1, n_head=4, n_positions=32,
                               eos_token_id=EOS, bos_token_id=EOS)).save_pretrained(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(" ".join(WORDS * 2) + "\n")  # 20 tokens
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    data = CausalLMData(predict_file=str(prompts))  # block_size 128 > 32: no matter, prompts are not cut to it
    assert len(trainer.predict(CausalLM(str(tmp_path), max_new_tokens=4), datamodule=data)[0]) == 1
    with pytest.raises(ValueError, match="prompts of 20 tokens and max_new_tokens 20 need 40 positions, but "
                                         "GPT2LMHeadModel has 32 learned positions"):  # was: IndexError in generate
        trainer.predict(CausalLM(str(tmp_path), max_new_tokens=20), datamodule=CausalLMData(predict_file=str(prompts)))
    with pytest.raises(ValueError, match="the data's block_size is 128 tokens, but GPT2LMHeadModel has 32 learned "
                                         "positions"):  # training blocks are that long: refused before any step
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False).fit(
            CausalLM(str(tmp_path)), datamodule=CausalLMData(train_file=str(prompts), val_fraction=0))


def test_predict_stops_at_the_tokenizers_end_token_where_the_model_config_names_none(tiny_lm_dir, tokenizer):
    task = CausalLM(model=str(tiny_lm_dir), max_new_tokens=4)
    task.configure_model()
    task.model.eval().generation_config.eos_token_id = None  # a base whose config names no end token

    def end_then_six(module, args, kwargs, output):
        """Logits that answer the end token (which `CausalLMData` ends each trained row with), and "six" after it."""
        after_end = kwargs["input_ids"][:, -1] == EOS
        output.logits[:, -1] = -1e4
        output.logits[:, -1, EOS] = torch.where(after_end, -1e4, 1e4)
        output.logits[:, -1, ID["six"]] = torch.where(after_end, 1e4, -1e4)
        return output

    task.model.register_forward_hook(end_then_six, with_kwargs=True)
    batch = tokenizer(["one two", "three"], return_tensors="pt", padding=True, padding_side="left")
    assert task.predict_step(dict(batch), 0) == ["", ""]  # was: "six six", generated past the end token
    with pytest.raises(ValueError, match="CausalLM max_new_tokens must be a positive integer, got 0"):
        CausalLM(model=str(tiny_lm_dir), max_new_tokens=0)  # was: accepted, failing in transformers at predict
