"""Where the embedding and lm_head rows of the tokens a merged tokenizer added start
(`new_row_init`).

- `subtoken_mean` (the default, Colossal-LLaMA-2's method): a new token's input row is the mean of
  the base model's input rows for the pieces the base tokenizer splits that token's text into, and
  likewise its lm_head row. "中国" starts as the average of, say, "▁中"/"国" or of its UTF-8 byte
  pieces: it looks like, and predicts like, the text it stands for. Each new row starts different.
- `mean`: every new row is the mean of all base rows (one vector for all new tokens: they cannot
  be told apart until training separates them, and the 30-step stage 1 of the demo barely did).
- `random`: N(0, initializer_range), drawn from the recipe's seed: what `resize_token_embeddings`
  gave in the transformers the original project used.

The base tokenizer of subtoken_mean is the merged tokenizer cut to the base model's rows: merging
appends tokens after the base's and keeps every base id, so the tokens [0, base_rows) are the
base tokenizer's, and row i of the base model is token i.
- SentencePiece (tokenizer.model, LLaMA-1/2): pieces [0, base_rows) with their scores and the
  normaliser. The text of a piece is encoded without SentencePiece's dummy "▁" prefix, so "国" (a
  word-internal piece) maps to what "国" is inside a word, and "▁中国" to a word start.
- BPE in tokenizer.json (byte-level BPE of Llama 3, SmolLM, Qwen; also Metaspace BPE): the vocabulary
  entries below base_rows and the merges whose two halves and result are all below it. A new
  token's string is in the model's own alphabet (byte-level: one character per byte, "ä¸Ń" for
  the first two bytes of "中"), and the merged tokenizer produced it inside one pre-token, so the
  base BPE is applied to that string as it is: what the base tokenizer makes of those bytes. A new
  token may be part of a character's UTF-8 bytes: as text it would not exist, as bytes it splits
  like any other. Tokens added outside the BPE (special tokens such as [PAD]) are plain text and
  are encoded with the whole base tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from chla_launcher.contract.errors import ChlaError

METHODS = ("subtoken_mean", "mean", "random")


@dataclass
class NewRowStats:
    method: str
    new_rows: int
    # subtoken_mean: base pieces per new token on average, and tokens whose text encodes to no
    # base piece (they start at the mean of all base rows instead)
    mean_subtokens: float | None = None
    fell_back_to_mean: int = 0

    def describe(self) -> str:
        text = f"{self.new_rows} new rows: {self.method}"
        if self.mean_subtokens is not None:
            text += f" ({self.mean_subtokens:.2f} base pieces per new token"
            text += f", {self.fell_back_to_mean} at the global mean)" if self.fell_back_to_mean else ")"
        return text


def init_new_rows(
    matrices: list[torch.Tensor],
    base_rows: int,
    method: str,
    *,
    tokenizer_dir: str | Path | None,
    seed: int,
    std: float,
    where: str,
) -> NewRowStats:
    """Fill rows [base_rows:] of each matrix (input embedding, then lm_head) in place."""
    if method not in METHODS:
        raise ValueError(f"unknown new_row_init {method!r}")
    total_rows = matrices[0].shape[0]
    new_count = total_rows - base_rows
    stats = NewRowStats(method, new_count)
    if new_count <= 0:
        return stats
    pieces: list[list[int]] = []
    if method == "subtoken_mean":
        pieces = subtoken_ids(tokenizer_dir, base_rows, total_rows, where=where)
        stats.mean_subtokens = sum(len(p) for p in pieces) / new_count
        stats.fell_back_to_mean = sum(1 for p in pieces if not p)
    # Drawn on the CPU and then moved: the same rows from the same seed on every device (a CUDA
    # generator draws other numbers, and would have to live on the matrix's device).
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for matrix in matrices:
            base = matrix[:base_rows].float()
            if method == "random":
                new = (torch.randn(new_count, base.shape[1], generator=generator) * std).to(base.device)
            elif method == "mean":
                new = base.mean(dim=0, keepdim=True).expand(new_count, -1)
            else:
                new = _subtoken_means(base, pieces)
            matrix[base_rows:] = new.to(matrix.dtype)
    return stats


def _subtoken_means(base: torch.Tensor, pieces: list[list[int]]) -> torch.Tensor:
    # The indices on the matrix's device: on a GPU run the matrix is on cuda:LOCAL_RANK (ZeRO-0/2
    # load there, ZeRO-3 gathers there) and embedding_bag refuses indices on another device.
    device = base.device
    flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long, device=device)
    offsets = torch.tensor([0] + [len(p) for p in pieces[:-1]], dtype=torch.long, device=device).cumsum(0)
    # mean over each token's base pieces; an empty bag gives zeros and is replaced below
    means = torch.nn.functional.embedding_bag(flat, base, offsets, mode="mean")
    empty = torch.tensor([not p for p in pieces], device=device)
    if empty.any():
        means[empty] = base.mean(dim=0)
    return means


def subtoken_ids(tokenizer_dir: str | Path | None, base_rows: int, total_rows: int, *, where: str) -> list[list[int]]:
    """For each id in [base_rows, total_rows): the base tokenizer's piece ids for its text."""
    directory = Path(tokenizer_dir) if tokenizer_dir else None
    if directory is not None and (directory / "tokenizer.model").is_file():
        return _sentencepiece_subtoken_ids(directory / "tokenizer.model", base_rows, total_rows, where=where)
    if directory is not None and (directory / "tokenizer.json").is_file():
        return _bpe_subtoken_ids(directory / "tokenizer.json", base_rows, total_rows, where=where)
    raise ChlaError(
        f"{where}: new_row_init subtoken_mean needs the tokenizer's SentencePiece model or its "
        f"tokenizer.json (neither found in {directory}); use new_row_init: mean for other tokenizers"
    )


def _sentencepiece_subtoken_ids(model_file: Path, base_rows: int, total_rows: int, *, where: str) -> list[list[int]]:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    tokenizer_dir = model_file.parent
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if len(proto.pieces) < base_rows:
        raise ChlaError(
            f"{where}: {model_file} has {len(proto.pieces)} pieces, fewer than the model's "
            f"{base_rows} base rows; it is not the merged tokenizer of this model"
        )
    texts = [piece.piece for piece in proto.pieces[base_rows:total_rows]]
    texts += _added_token_texts(tokenizer_dir, len(proto.pieces), total_rows)
    del proto.pieces[base_rows:]
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    base = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return [list(ids) for ids in base.encode([text.replace("\u2581", " ") for text in texts])]


def _added_token_texts(tokenizer_dir, sp_size: int, total_rows: int) -> list[str]:
    """Texts of ids past the SentencePiece model (tokens the HF tokenizer added, e.g. [PAD])."""
    if total_rows <= sp_size:
        return []
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [str(tokenizer.convert_ids_to_tokens(i) or "") for i in range(sp_size, total_rows)]


def _bpe_subtoken_ids(tokenizer_file: Path, base_rows: int, total_rows: int, *, where: str) -> list[list[int]]:
    """subtoken_ids for a tokenizer.json whose model is BPE: its base part applied to each new
    token's own string (see the module's docstring)."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ChlaError(
            f"{where}: new_row_init subtoken_mean reads a BPE model from {tokenizer_file}, but its model "
            f"is {model.get('type')!r}; use new_row_init: mean for this tokenizer"
        )
    vocab: dict[str, int] = model["vocab"]
    added = {int(token["id"]): token["content"] for token in spec.get("added_tokens") or []}
    if max([*vocab.values(), *added], default=-1) + 1 < total_rows:
        raise ChlaError(
            f"{where}: {tokenizer_file} holds no token for some of the model's {total_rows} rows; "
            "it is not the tokenizer of this model"
        )

    def halves(merge) -> list[str]:  # "a b" (older tokenizer.json) or ["a", "b"]
        return merge.split(" ", 1) if isinstance(merge, str) else list(merge)

    def in_base(token: str) -> bool:
        return vocab.get(token, base_rows) < base_rows

    base_model = dict(
        model,
        dropout=None,  # BPE-dropout would split at random
        vocab={token: i for token, i in vocab.items() if i < base_rows},
        merges=[m for m in model.get("merges", []) if all(map(in_base, [*halves(m), "".join(halves(m))]))],
    )
    base_added = [token for token in spec.get("added_tokens") or [] if int(token["id"]) < base_rows]
    base = Tokenizer.from_str(json.dumps(dict(spec, model=base_model, added_tokens=base_added)))
    strings = {i: token for token, i in vocab.items() if i >= base_rows}
    pieces = []
    for i in range(base_rows, total_rows):
        if i in added:
            pieces.append(base.encode(added[i], add_special_tokens=False).ids)
        elif i in strings:
            pieces.append([token.id for token in base.model.tokenize(strings[i])])
        else:  # an id nothing names (a gap): starts at the mean of all base rows
            pieces.append([])
    return pieces
