"""Byte-level BPE merge: the merges of a BPE trained with the base's pre-tokenizer (train_bpe)
appended after a byte-level BPE base's (Llama 3, SmolLM, Qwen), written as an HF tokenizer
directory.

What the merged tokenizer keeps, by construction:
- every base id: the base's vocabulary and added tokens (<|im_start|>, <|endoftext|>, Llama 3's
  reserved specials) keep their ids; new tokens get the ids after the largest of them. Added
  tokens that lie past the model's vocabulary are written into it at their own ids, because
  `tokenizers` gives an added token missing from the model the id "model size + n", which the
  new tokens would otherwise shift (measured: <|im_start|> 280 -> 281 with one new token);
- the base's tokenization of ASCII text (English, code): a new merge is kept only if the token it
  makes holds a non-ASCII byte, so it needs a non-ASCII half and never fires on ASCII text; the
  new merges rank after all the base's, so where a base merge applies it applies first. (Chinese
  corpora hold English words; without this rule their merges change how English text splits:
  in the tests, 1 of 214 held-out English lines.) Non-ASCII characters that English also uses
  ("…", "—", "é") keep the base's tokens where the base holds them whole; where the base spells
  one in bytes, the new tokens may join them there too.
- a merge only where both halves are tokens (base or new): in ranked BPE a merge with a missing
  half can never fire. One merge per new token; pairs whose result the base already has are
  not added (the base's own route to that token stays the only one).
- no dead rows: a new token the merged model does not produce from its own bytes (the base's
  merges split those bytes first, so the pair the Chinese BPE joined never meets) is removed with
  every token built on it, until each new token is produced by its own bytes. Each dead row
  would be an embedding no text can train.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chla_launcher.contract.atomic import new_directory, write_json
from chla_launcher.contract.errors import ChlaError

from .byte_level import canonical_component, load_byte_level_bpe, resolve_tokenizer_json, token_bytes
from .log import Log, print_line

if TYPE_CHECKING:
    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams

PAD_TOKEN = "[PAD]"
# Files of an HF tokenizer directory that the merged directory takes from the base unchanged
# (vocab.json / merges.txt are not among them: they would describe the base's vocabulary).
_COPIED = ("chat_template.jinja", "chat_template.json")
# Written by transformers 5 about how it loaded a tokenizer, not about the tokenizer.
_LOAD_KEYS = ("backend", "is_local", "local_files_only")


def append_merges(base: dict[str, Any], added: dict[str, Any]) -> tuple[list[str], list[list[str]], dict[str, int]]:
    """The new tokens and merges that `added`'s merges contribute to `base` (parsed tokenizer.json
    forms), in the added model's merge order, before dead rows are removed; and the count of
    merges skipped per reason."""
    vocab = base["model"]["vocab"]
    base_pairs = {tuple(pair) for pair in base["model"]["merges"]}
    known, new_tokens, new_merges = set(vocab), [], []
    skipped = {"known": 0, "ascii": 0, "missing_half": 0}
    for symbol in added["model"]["vocab"]:
        # a byte symbol the base lacks (GPT-2-style bases have all 256)
        data = token_bytes(symbol)
        if data is not None and len(data) == 1 and symbol not in known:
            known.add(symbol)
            new_tokens.append(symbol)
    for left, right in added["model"]["merges"]:
        token = left + right
        if (left, right) in base_pairs or token in known:
            skipped["known"] += 1
        elif (token_bytes(token) or b"").isascii():
            skipped["ascii"] += 1
        elif left not in known or right not in known:
            skipped["missing_half"] += 1
        else:
            known.add(token)
            new_tokens.append(token)
            new_merges.append([left, right])
    return new_tokens, new_merges, skipped


def first_new_id(base: dict[str, Any]) -> int:
    """The id after every base id: the model's vocabulary and the added tokens."""
    ids = [*base["model"]["vocab"].values(), *(token["id"] for token in base.get("added_tokens") or [])]
    return max(ids) + 1


def build_merged(base: dict[str, Any], new_tokens: list[str], new_merges: list[list[str]]) -> dict[str, Any]:
    """The base's tokenizer.json form with `new_tokens` appended (ids from first_new_id) and
    `new_merges` ranked after the base's merges."""
    merged = json.loads(json.dumps(base))
    vocab = merged["model"]["vocab"]
    for token in merged.get("added_tokens") or []:
        if token["content"] not in vocab:
            vocab[token["content"]] = token["id"]  # module docstring: keeps the added tokens' ids
    start = first_new_id(base)
    for offset, token in enumerate(new_tokens):
        vocab[token] = start + offset
    merged["model"]["merges"] = [*merged["model"]["merges"], *new_merges]
    return merged


def tokenizer_from(data: dict[str, Any]):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def dead_tokens(model, new_tokens: list[str]) -> list[str]:
    """New tokens that the BPE `model` does not produce from their own bytes (a pre-token made of
    exactly that token's byte symbols; partial UTF-8 characters included)."""
    dead = []
    for token in new_tokens:
        pieces = model.tokenize(token)
        if len(pieces) != 1 or pieces[0].value != token:
            dead.append(token)
    return dead


def prune_dead(
    base: dict[str, Any], new_tokens: list[str], new_merges: list[list[str]], log: Log
) -> tuple[list[str], list[list[str]], int]:
    """Remove dead new tokens with every token built on them until none is dead. Returns the
    living tokens and merges and how many were removed."""
    removed_total, rounds = 0, 0
    while True:
        rounds += 1
        model = tokenizer_from(build_merged(base, new_tokens, new_merges)).model
        dead = set(dead_tokens(model, new_tokens))
        if not dead:
            return new_tokens, new_merges, removed_total
        if rounds > 20:  # each round removes at least one token; this only bounds a bug
            raise RuntimeError(f"dead tokens remain after {rounds} pruning rounds, e.g. {sorted(dead)[:3]}")
        kept_tokens, kept_merges = [], []
        merge_of = {left + right: [left, right] for left, right in new_merges}
        for token in new_tokens:
            halves = merge_of.get(token)
            if token in dead or (halves and (halves[0] in dead or halves[1] in dead)):
                dead.add(token)  # built on a dead token: never produced either
                continue
            kept_tokens.append(token)
            if halves:
                kept_merges.append(halves)
        log(f"pruning round {rounds}: {len(new_tokens) - len(kept_tokens):,} tokens never produced")
        removed_total += len(new_tokens) - len(kept_tokens)
        new_tokens, new_merges = kept_tokens, kept_merges


def merge_byte_level(
    params: MergeTokenizerParams, out_dir: str | os.PathLike[str], log: Log = print_line
) -> dict[str, Any]:
    """Append the merges of the byte-level BPE `params.add` (a train_bpe output) to the base
    byte-level BPE `params.base`. Writes out_dir/tokenizer/ (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, the base's chat template) and out_dir/merge.json. With
    `params.pad_token`, one special token "[PAD]" is appended last."""
    started = time.monotonic()
    if params.scores != "below_base":
        raise ChlaError(f"scores: {params.scores}: applies to SentencePiece merges only; drop it for {params.base}")
    base_path = resolve_tokenizer_json(params.base, role="base tokenizer")
    add_path = resolve_tokenizer_json(params.add, role="added BPE (a train_bpe stage's out directory)")
    base = load_byte_level_bpe(base_path, role="base tokenizer")
    added = load_byte_level_bpe(add_path, role="added BPE")
    pre_tokenizers = (canonical_component("pre_tokenizer", model.get("pre_tokenizer")) for model in (base, added))
    if len(set(pre_tokenizers)) > 1:
        raise ChlaError(
            f"{add_path}: its pre-tokenizer differs from the base's ({base_path}); train it with "
            f"train_bpe against this base (base: {params.base})"
        )
    if params.pad_token and any(t["content"] == PAD_TOKEN for t in base.get("added_tokens") or []):
        raise ChlaError(f"{base_path}: base already has a {PAD_TOKEN} token; drop pad_token")

    candidates, candidate_merges, skipped = append_merges(base, added)
    new_tokens, new_merges, pruned = prune_dead(base, candidates, candidate_merges, log)
    merged = build_merged(base, new_tokens, new_merges)
    base_size = first_new_id(base)
    merged_size = base_size + len(new_tokens)
    if params.pad_token:
        merged.setdefault("added_tokens", []).append(
            {
                "id": merged_size,
                "content": PAD_TOKEN,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
        merged["model"]["vocab"][PAD_TOKEN] = merged_size
    final_size = merged_size + int(params.pad_token)
    tokenizer = tokenizer_from(merged)
    _check_base_ids_and_specials(base, tokenizer)

    summary = {
        "family": "byte_level_bpe",
        "base": str(base_path),
        "added_model": str(add_path),
        "base_size": base_size,
        "added_model_merges": len(added["model"]["merges"]),
        "skipped_merges": skipped,
        "dead_tokens_removed": pruned,
        "new_pieces": len(new_tokens),
        "merged_size": merged_size,
        "pad_token": PAD_TOKEN if params.pad_token else None,
        "final_size": final_size,
    }
    with new_directory(out_dir) as tmp:
        _write_tokenizer_dir(tokenizer, base_path, tmp / "tokenizer", pad_token=params.pad_token)
        write_json(tmp / "merge.json", summary)
    arithmetic = f"{base_size} + {len(new_tokens)} new = {merged_size}"
    if params.pad_token:
        arithmetic += f"; + {PAD_TOKEN} = {final_size}"
    log(
        f"merged vocabulary: {arithmetic} ({summary['added_model_merges']:,} merges offered: "
        f"{skipped['known']:,} making a token already there, {skipped['ascii']:,} ASCII-only, "
        f"{skipped['missing_half']:,} with a missing half, {pruned:,} never produced; "
        f"{time.monotonic() - started:.1f} s) -> {out_dir}"
    )
    summary["arithmetic"] = arithmetic
    summary["seconds"] = round(time.monotonic() - started, 2)
    return summary


def _check_base_ids_and_specials(base: dict[str, Any], tokenizer) -> None:
    """Every base token and added token keeps its id in the merged tokenizer (a bug otherwise)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    moved = [token for token, i in base["model"]["vocab"].items() if vocab.get(token) != i]
    moved += [t["content"] for t in base.get("added_tokens") or [] if vocab.get(t["content"]) != t["id"]]
    if moved:
        raise RuntimeError(f"{len(moved)} base tokens changed id in the merge, e.g. {moved[:3]}")


def _write_tokenizer_dir(tokenizer, base_path: Path, out: Path, pad_token: bool) -> None:
    """tokenizer.json plus the base's config, special-token map and chat template, with the class
    transformers 4 and 5 both load exactly as written (chla_tools.hf_tokenizer)."""
    from chla_tools.hf_tokenizer import PORTABLE_CLASS

    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    base_dir = base_path.parent
    config = _read_json(base_dir / "tokenizer_config.json")
    special = _read_json(base_dir / "special_tokens_map.json")
    for key in _LOAD_KEYS:
        config.pop(key, None)
    config["tokenizer_class"] = PORTABLE_CLASS
    if not special:
        special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str | dict)}
    if pad_token:
        config["pad_token"] = special["pad_token"] = PAD_TOKEN
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            decoder[str(tokenizer.token_to_id(PAD_TOKEN))] = {
                "content": PAD_TOKEN,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", special)
    for name in _COPIED:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out / name)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ChlaError(f"{path}: not valid JSON ({error}); fix or remove it") from None
    return data if isinstance(data, dict) else {}
