"""Pre-tokenization: correct ids, same stream for 1 and 4 tasks, content-addressed cache,
SIGKILL mid-write, long lines, paragraphs and JSON inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from chla_launcher.contract.kinds.pretokenize import PretokenizeParams
from chla_tools import pretokenize as pt
from chla_tools.blocks import TokenCorpus
from chla_train.stages import pretokenize as pretokenize_stage

from .conftest import stage_context

SMALL = pt.Layout(piece_bytes=64 << 10, batch_bytes=16 << 10)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path, zh_lines) -> list[Path]:
    inputs = tmp_path / "in"
    inputs.mkdir()
    return [
        write_lines(inputs / "a.txt", zh_lines[:900]),
        write_lines(inputs / "b.txt", zh_lines[900:1400]),
        write_lines(inputs / "c.txt", zh_lines[1400:1500]),
    ]


def stream(out_dir: Path) -> np.ndarray:
    return TokenCorpus(out_dir).tokens()


def test_ids_equal_sentencepiece_and_manifest(tmp_path, corpus, zh_lines, sp_reference, demo_assets):
    result = pt.pretokenize(
        [str(tmp_path / "in" / "*.txt")],
        demo_assets["base_tokenizer"],
        tmp_path / "out",
        workers=2,
        layout=SMALL,
        cache_dir=tmp_path / "cache",
        block_size=512,
        log=lambda m: None,
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    expected = sp_reference(zh_lines[:1500])
    assert stream(tmp_path / "out").tolist() == expected
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 32000 and manifest["eos_id"] == 2
    assert manifest["block_size"] == 512
    assert manifest["tokenizer"]["fingerprint"] == pt.tokenizer_fingerprint(Path(demo_assets["base_tokenizer"]))
    assert manifest["totals"]["tokens"] == len(expected) == result["tokens"]
    assert manifest["totals"]["documents"] == 1500
    assert [s["path"] for s in manifest["sources"]] == [str(p.resolve()) for p in corpus]
    assert [s["size"] for s in manifest["sources"]] == [p.stat().st_size for p in corpus]
    assert all(s["hash"].startswith("blake2b-pieces:") for s in manifest["sources"])
    assert len(manifest["shards"]) > 3  # a.txt alone spans several 64 KB pieces
    for shard in manifest["shards"]:
        assert (tmp_path / "out" / shard["file"]).stat().st_size == 2 * shard["tokens"]


def test_one_task_and_four_tasks_give_the_same_stream(tmp_path, corpus, demo_assets):
    inputs = [str(tmp_path / "in" / "*.txt")]
    pt.pretokenize(
        inputs,
        demo_assets["base_tokenizer"],
        tmp_path / "one",
        num_shards=1,
        workers=2,
        layout=SMALL,
        cache_dir=tmp_path / "cache1",
        log=lambda m: None,
    )
    # Four separate invocations of the stage runner (as four array tasks), then finalize; own cache,
    # so the four tasks really tokenize.
    params = PretokenizeParams(
        tokenizer=demo_assets["base_tokenizer"],
        inputs=inputs,
        workers=1,
        cache_dir=str(tmp_path / "cache4"),
        piece_mb=64 / 1024,
    )
    results = [pretokenize_stage.run(stage_context(params, tmp_path / "four", task, 4)) for task in range(4)]
    assert sum(r["pieces_tokenized"] for r in results) == sum(r["pieces"] for r in results)
    assert sum(1 for r in results if r["tokens"]) >= 3  # the work really was spread
    assert not (tmp_path / "four" / "manifest.json").exists()  # only finalize writes it
    metrics = pretokenize_stage.finalize(stage_context(params, tmp_path / "four", -1, 4))
    one, four = stream(tmp_path / "one"), stream(tmp_path / "four")
    assert metrics["tokens"] == len(one) == len(four)
    assert np.array_equal(one, four)


def test_cache_reuses_unchanged_and_retokenizes_only_changes(tmp_path, corpus, zh_lines, sp_reference, demo_assets):
    args = dict(
        tokenizer_dir=demo_assets["base_tokenizer"],
        out_dir=tmp_path / "out",
        workers=1,
        layout=SMALL,
        cache_dir=tmp_path / "cache",
        log=lambda m: None,
    )
    inputs = [str(tmp_path / "in" / "*.txt")]
    first = pt.pretokenize(inputs, **args)
    again = pt.pretokenize(inputs, **args)
    assert first["pieces_tokenized"] > 0 and again["pieces_tokenized"] == 0
    assert again["pieces_cached"] == first["pieces_tokenized"]

    # Change the small file (one piece) and add a new one: only those two pieces are tokenized.
    write_lines(corpus[2], zh_lines[1400:1500] + ["新增的一行文字。"])
    write_lines(tmp_path / "in" / "d.txt", zh_lines[2000:2050])
    changed = pt.pretokenize(inputs, **args)
    assert changed["pieces_tokenized"] == 2
    expected = sp_reference(zh_lines[:1500] + ["新增的一行文字。"] + zh_lines[2000:2050])
    assert stream(tmp_path / "out").tolist() == expected

    # Other options are another cache entry (BOS before each document).
    bos = pt.pretokenize(inputs, **{**args, "options": pt.PretokenizeOptions(prepend_bos=True)})
    assert bos["pieces_tokenized"] == bos["shards"]
    assert stream(tmp_path / "out")[0] == 1


def test_every_params_field_is_an_option_or_changes_no_id():
    """The cache key holds the options: a `pretokenize` params field that changes the ids must be
    an option (taken from the params by name), or a changed value would reuse ids made without it."""
    options = {field.name for field in dataclasses.fields(pt.PretokenizeOptions)}
    assert set(PretokenizeParams.model_fields) - pt.NOT_OPTIONS <= options
    assert not pt.NOT_OPTIONS & options
    params = PretokenizeParams(tokenizer="tok", inputs=["a.txt"], text_key="body", prepend_bos=True, piece_mb=0.5)
    assert pt.PretokenizeOptions.from_params(params) == pt.PretokenizeOptions(text_key="body", prepend_bos=True)
    assert pt.PretokenizeOptions.from_params(params) != pt.PretokenizeOptions()  # the control
    assert pt.Layout.from_params(params) == pt.Layout(piece_bytes=512 << 10)


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from chla_tools import pretokenize as pt
    if __name__ == "__main__":
        tokenizer, corpus, out, cache = sys.argv[1:5]
        pt.run_task([corpus], tokenizer, out, 0, 1, layout=pt.Layout(piece_bytes=256 << 10, batch_bytes=8 << 10),
                    cache_dir=cache, workers=1, log=lambda m: None)
""")


def _visible_shards_are_complete(out: Path, cache: Path) -> int:
    """Every visible .bin is complete (its .json names its size); returns committed cache entries."""
    committed = 0
    for path in cache.glob("*.bin"):
        counts = json.loads((cache / (path.stem + ".json")).read_text())  # a .bin never shows first
        assert path.stat().st_size == 2 * counts["tokens"]
    for path in cache.glob("*.json"):
        committed += 1
        assert (cache / (path.stem + ".bin")).stat().st_size == 2 * json.loads(path.read_text())["tokens"]
    for path in out.glob("shard-*.bin"):
        assert path.stat().st_size == 2 * json.loads(path.with_suffix(".json").read_text())["tokens"]
    return committed


def test_sigkill_mid_write_leaves_no_partial_shard_and_rerun_fills_in(tmp_path, zh_lines, sp_reference, demo_assets):
    lines = zh_lines[:6000]
    corpus = write_lines(tmp_path / "big.txt", lines)  # ~2 MB, 8 pieces of 256 KB
    script = tmp_path / "task.py"
    script.write_text(KILL_SCRIPT)
    out, cache = tmp_path / "out", tmp_path / "cache"
    # The tokenizer check (cached per tokenizer) first, so the child starts tokenizing at once.
    pt.load_tokenizer_info(demo_assets["base_tokenizer"], cache)
    process = subprocess.Popen(
        [sys.executable, str(script), demo_assets["base_tokenizer"], str(corpus), str(out), str(cache)],
        start_new_session=True,
    )
    killed_mid_write = False
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if list(cache.glob("*.json")) and list(cache.glob(".*.tmp")):
            os.killpg(process.pid, signal.SIGKILL)  # the task and its worker processes
            killed_mid_write = True
            break
        time.sleep(0.002)
    process.wait()
    assert killed_mid_write, "the task finished before it could be killed; make the corpus bigger"
    assert process.returncode == -signal.SIGKILL
    assert list(cache.glob(".*.tmp"))  # the killed write is there, but hidden
    committed = _visible_shards_are_complete(out, cache)
    assert 1 <= committed < 8
    assert not (out / "manifest.json").exists()

    result = pt.pretokenize(
        [str(corpus)],
        demo_assets["base_tokenizer"],
        out,
        workers=1,
        layout=pt.Layout(piece_bytes=256 << 10),
        cache_dir=cache,
        log=lambda m: None,
    )
    assert result["pieces_cached"] == committed
    assert result["pieces_tokenized"] == result["shards"] - committed
    assert not list(out.glob(".*.tmp"))
    assert stream(out).tolist() == sp_reference(lines)


def test_long_line_is_encoded_in_chunks(tmp_path, zh_lines, sp_reference, demo_assets):
    """A line far longer than chunk_bytes is cut at punctuation and encoded piecewise (bounded
    memory); the ids equal encoding the whole line at once."""
    long_line = "".join(zh_lines[:400])  # ~140 KB, one document
    corpus = write_lines(tmp_path / "long.txt", zh_lines[400:420] + [long_line] + zh_lines[420:430])
    items = list(pt.work_items(str(corpus), "txt", "line", 0, corpus.stat().st_size, 4096, 8192))
    assert sum(1 for item in items if item[0] == "chunk") > 10
    pt.pretokenize(
        [str(corpus)],
        demo_assets["base_tokenizer"],
        tmp_path / "out",
        workers=2,
        options=pt.PretokenizeOptions(chunk_bytes=8192),
        layout=pt.Layout(batch_bytes=4096),
        cache_dir=tmp_path / "cache",
        log=lambda m: None,
    )
    expected = sp_reference(zh_lines[400:420] + [long_line] + zh_lines[420:430])
    assert stream(tmp_path / "out").tolist() == expected

    # English: cuts fall before a space, so every chunk starts a word as in the whole line.
    english = " ".join(Path(demo_assets["en_text"]).read_text(encoding="utf-8").split())[:60000]
    corpus = write_lines(tmp_path / "long_en.txt", [english])
    pt.pretokenize(
        [str(corpus)],
        demo_assets["base_tokenizer"],
        tmp_path / "out_en",
        workers=2,
        options=pt.PretokenizeOptions(chunk_bytes=4096),
        layout=pt.Layout(batch_bytes=2048),
        cache_dir=tmp_path / "cache",
        log=lambda m: None,
    )
    assert stream(tmp_path / "out_en").tolist() == sp_reference([english])


def test_paragraph_documents_and_json_inputs(tmp_path, zh_lines, sp_reference, demo_assets):
    paragraphs = ["\n".join(zh_lines[i : i + 3]) for i in range(0, 600, 3)]
    txt = tmp_path / "para.txt"
    txt.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    pt.pretokenize(
        [str(txt)],
        demo_assets["base_tokenizer"],
        tmp_path / "p",
        workers=2,
        options=pt.PretokenizeOptions(txt_documents="paragraph"),
        layout=SMALL,
        cache_dir=tmp_path / "cache",
        log=lambda m: None,
    )
    assert stream(tmp_path / "p").tolist() == sp_reference(paragraphs)

    docs = zh_lines[:300]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"content": d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)),
        encoding="utf-8",
    )
    array = tmp_path / "docs.json"
    array.write_text(json.dumps([{"content": d} for d in docs], ensure_ascii=False), encoding="utf-8")
    pt.pretokenize(
        [str(jsonl), str(array)],
        demo_assets["base_tokenizer"],
        tmp_path / "j",
        workers=2,
        options=pt.PretokenizeOptions(text_key="content"),
        layout=SMALL,
        cache_dir=tmp_path / "cache",
        log=lambda m: None,
    )
    assert stream(tmp_path / "j").tolist() == sp_reference(docs) * 2


@pytest.mark.slow
def test_hf_encoder_gives_the_same_ids_on_chinese(tmp_path, zh_lines, sp_reference, demo_assets):
    corpus = write_lines(tmp_path / "a.txt", zh_lines[:200])
    pt.pretokenize(
        [str(corpus)],
        demo_assets["base_tokenizer"],
        tmp_path / "out",
        workers=1,
        options=pt.PretokenizeOptions(encoder="hf"),
        cache_dir=tmp_path / "cache",
        log=lambda m: None,
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {s["encoder"] for s in manifest["shards"]} == {"hf"}
    assert stream(tmp_path / "out").tolist() == sp_reference(zh_lines[:200])
