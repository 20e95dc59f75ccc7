"""GGUF export (stage kind `export`, `chla export gguf`): an HF model directory -> one file that
llama.cpp, llama-cpp-python, Ollama and LM Studio load.

The conversion is llama.cpp's own convert_hf_to_gguf.py, run in a subprocess with the gguf-py
package it ships with (it puts that first on its path), never a converter of ours: the file is
what llama.cpp's authors write for a LLaMA. Both come from the llama-cpp-python sdist on PyPI,
which vendors llama.cpp; the sdist is pinned by sha256 and cached like the demo assets, and the
three parts the converter needs are unpacked once beside it.

Before converting, the model's vocabulary rows (config vocab_size, embed_tokens, lm_head) are
checked against its tokenizer: the converter pads a short tokenizer with placeholder tokens and
drops the ids of a long one, so a 49953/49954-style mismatch would otherwise become a GGUF that
loads and generates the wrong text. The file is written under a temporary name and renamed.

Both tokenizer families convert: a SentencePiece tokenizer (tokenizer.model, LLaMA-1/2 style) and
a byte-level BPE one (tokenizer.json only: SmolLM, Llama 3, GPT-2 style). For the latter the
converter must name llama.cpp's pre-tokenizer, which it finds by hashing the ids the tokenizer
gives for a fixed text against a list of known tokenizers. A vocabulary extended with appended
tokens and merges (chla's Chinese extension) gives other ids for the Chinese in that text, so the
hash is unknown and the converter refuses, although the text is split exactly as in the base.
chla therefore runs the converter with its hash lookup wrapped (the file on disk is untouched):
a hash it recognises still decides; an unknown one gets the name of the base's pre-tokenizer,
read from tokenizer.json's `pre_tokenizer` block (chla_tools.gguf_pre_tokenizers) or given as
`pre_tokenizer:`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chla_launcher.contract.atomic import new_directory
from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.export import ExportParams
from chla_tools.assets import Package, _download, _locked, default_cache_dir
from chla_tools.gguf_pre_tokenizers import PRE_TOKENIZERS, llama_cpp_name

Log = Callable[[str], None]

LLAMA_CPP = Package(
    "llama-cpp-python",
    "0.3.36",
    "llama_cpp_python-0.3.36.tar.gz",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    True,
    "MIT",
)
# What convert_hf_to_gguf.py imports from its own tree.
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def converter_dir(cache: Path | None = None, offline: bool = False, log: Log = _print) -> Path:
    """The directory holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/,
    fetched and unpacked at most once per cache (the sdist is 77 MB)."""
    cache = cache or default_cache_dir()
    target = cache / f"llama.cpp-{LLAMA_CPP.version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if (target / "convert_hf_to_gguf.py").is_file():
            return target
        sdist = _download(LLAMA_CPP, cache / "downloads", offline, log)
        prefix = f"llama_cpp_python-{LLAMA_CPP.version}/vendor/llama.cpp/"
        with new_directory(target) as tmp:
            with tarfile.open(sdist) as archive:
                members = []
                for member in archive.getmembers():
                    relative = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
                    if relative and any(
                        relative == part or (part.endswith("/") and relative.startswith(part))
                        for part in _CONVERTER_PARTS
                    ):
                        member.name = relative
                        members.append(member)
                archive.extractall(tmp, members=members, filter="data")
            if not (tmp / "convert_hf_to_gguf.py").is_file():
                raise ChlaError(
                    f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside; "
                    "delete it so that it is downloaded again"
                )
            os.chmod(tmp, 0o755)
    log(f"llama.cpp converter from {LLAMA_CPP.name}=={LLAMA_CPP.version} in {target}")
    return target


def check_vocabulary(model_dir: Path) -> int:
    """The vocabulary size, once the model's rows and its tokenizer agree; else one line that
    says where they differ."""
    from chla_tools.merge import Checkpoint, tokenizer_size

    checkpoint = Checkpoint(model_dir)
    rows = {"config.json vocab_size": checkpoint.config.get("vocab_size")}
    for key in (EMBED_KEY, LM_HEAD_KEY):
        if key in checkpoint.files:
            rows[f"{key} rows"] = checkpoint.entry(key).shape[0]
    sentencepiece = (model_dir / "tokenizer.model").is_file()
    if not sentencepiece and _byte_level_bpe(model_dir) is None:
        raise ChlaError(
            f"{model_dir}: no tokenizer.model and no byte-level BPE tokenizer.json; GGUF export needs "
            "the tokenizer beside the weights (chla's merge and training stages write it)"
        )
    tokens = tokenizer_size(model_dir)
    # A byte-level tokenizer.json holds every token itself, which is what the converter reads.
    named = _tokens_the_converter_names(model_dir) if sentencepiece else tokens
    differing = {where: count for where, count in rows.items() if count != tokens}
    if differing:
        where, count = next(iter(differing.items()))
        raise ChlaError(
            f"{model_dir}: the tokenizer has {tokens} tokens but {where} is {count}; "
            "the model and its tokenizer must come from the same stage (e.g. the SFT "
            "tokenizer with its [PAD] for the SFT-merged model)"
        )
    if named != tokens:
        raise ChlaError(
            f"{model_dir}: tokenizer.model and tokenizer_config.json's added_tokens_decoder "
            f"name {named} of the {tokens} tokens; llama.cpp's converter reads only those. "
            "Save the tokenizer with transformers 4, or merge/train with chla, which writes both"
        )
    return tokens


def _byte_level_bpe(model_dir: Path) -> dict[str, Any] | None:
    """tokenizer.json when it is a byte-level BPE tokenizer (a BPE model with a ByteLevel decoder),
    else None."""
    import json

    path = model_dir / "tokenizer.json"
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    decoder = tokenizer.get("decoder") or {}
    if (tokenizer.get("model") or {}).get("type") == "BPE" and decoder.get("type") == "ByteLevel":
        return tokenizer
    return None


def pre_tokenizer_name(model_dir: Path, given: str | None) -> str | None:
    """llama.cpp's pre-tokenizer name to give the converter for a byte-level BPE model: `given`,
    else the one its tokenizer.json's pre-tokenizer is; None for a SentencePiece model. One line
    naming the way out when it is byte-level BPE and neither says."""
    tokenizer = None if (model_dir / "tokenizer.model").is_file() else _byte_level_bpe(model_dir)
    if tokenizer is None:
        return given
    if given is not None:
        return given
    name = llama_cpp_name(tokenizer)
    if name is None:
        raise ChlaError(
            f"{model_dir / 'tokenizer.json'}: its pre_tokenizer is none chla knows llama.cpp's name of "
            f"({', '.join(PRE_TOKENIZERS)}); set the export's pre_tokenizer (--pre-tokenizer) to the name "
            "llama.cpp's convert_hf_to_gguf.py gives the base model"
        )
    return name


# Runs convert_hf_to_gguf.py as its own `python convert_hf_to_gguf.py ARGS` would, with the hash
# lookup wrapped: argv is CONVERTER_DIR PRE_TOKENIZER ARGS...
_CONVERT_WITH_PRE_TOKENIZER = """
import logging, sys
converter, fallback = sys.argv[1], sys.argv[2]
sys.argv = [converter + "/convert_hf_to_gguf.py", *sys.argv[3:]]
sys.path.insert(0, converter)
import convert_hf_to_gguf
from conversion.base import TextModel
recognise = TextModel.get_vocab_base_pre
log = logging.getLogger("hf-to-gguf")
def get_vocab_base_pre(self, tokenizer):
    log.disabled = True  # its banner for an unknown hash is about a new model, which this is not
    try:
        name = recognise(self, tokenizer)
    except NotImplementedError:
        name = None
    finally:
        log.disabled = False
    if name is None:
        log.info(f"pre-tokenizer: the hash of the vocabulary is not one llama.cpp lists (an extended vocabulary); "
                 f"the base's pre-tokenizer is {fallback!r}")
        return fallback
    log.info(f"pre-tokenizer: {name!r}, recognised by its hash")
    return name
TextModel.get_vocab_base_pre = get_vocab_base_pre
convert_hf_to_gguf.main()
"""


def _tokens_the_converter_names(model_dir: Path) -> int:
    import json

    import sentencepiece

    ids = set(
        range(sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")).get_piece_size())
    )
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        ids |= {int(i) for i in json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}}
    if (model_dir / "added_tokens.json").is_file():
        ids |= set(json.loads((model_dir / "added_tokens.json").read_text(encoding="utf-8")).values())
    return len(ids)


def export_gguf(
    params: ExportParams,
    out_file: str | os.PathLike[str],
    cache: Path | None = None,
    offline: bool = False,
    log: Log = _print,
) -> dict[str, Any]:
    """Convert the model of `params` with llama.cpp's converter into `out_file` (atomically)."""
    started = time.monotonic()
    model_dir, out_file, outtype = Path(params.model).resolve(), Path(out_file).resolve(), params.outtype
    if not model_dir.is_dir():
        raise ChlaError(f"{model_dir}: model directory not found")
    vocab_size = check_vocabulary(model_dir)
    pre_tokenizer = pre_tokenizer_name(model_dir, params.pre_tokenizer)
    converter = converter_dir(cache, offline, log)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    log(f"converting {model_dir} to GGUF ({outtype}, vocabulary {vocab_size}) with llama.cpp's convert_hf_to_gguf.py")
    try:
        # Its log (one line per tensor) is the progress of a long conversion: pass it on.
        process = subprocess.Popen(
            [
                sys.executable,
                *(
                    ["-c", _CONVERT_WITH_PRE_TOKENIZER, str(converter), pre_tokenizer]
                    if pre_tokenizer is not None
                    else [str(converter / "convert_hf_to_gguf.py")]
                ),
                str(model_dir),
                "--outfile",
                str(tmp),
                "--outtype",
                outtype,
                "--model-name",
                _model_name(model_dir),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        last = "no output"
        assert process.stdout is not None  # stdout=PIPE
        try:
            for line in process.stdout:
                line = line.rstrip().rsplit("\r", 1)[-1]
                if line.strip():
                    last = line
                    log(f"convert_hf_to_gguf: {line}")
            process.wait()
        finally:
            if process.poll() is None:  # interrupted: the converter must not outlive us
                process.kill()
                process.wait()
        if process.returncode != 0 or not tmp.is_file():
            raise ChlaError(
                f"{model_dir}: llama.cpp's convert_hf_to_gguf.py failed (exit {process.returncode}): {last}"
            )
        with open(tmp, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ChlaError(f"{tmp}: the converter wrote no GGUF header")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    size = out_file.stat().st_size
    seconds = time.monotonic() - started
    log(f"wrote {out_file} ({size / 1e6:.1f} MB) in {seconds:.1f} s")
    return {
        "file": str(out_file),
        "bytes": size,
        "outtype": outtype,
        "vocab_size": vocab_size,
        "pre_tokenizer": pre_tokenizer,
        "converter": f"{LLAMA_CPP.name}=={LLAMA_CPP.version}",
        "seconds": round(seconds, 2),
    }


def _model_name(model_dir: Path) -> str:
    """general.name in the file: the directory's name, or its stage's for a stage's out/."""
    return model_dir.parent.name if model_dir.name == "out" else model_dir.name
