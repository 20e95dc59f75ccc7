"""The encoder each worker process holds: documents -> one flat id array, with SentencePiece
directly or the HF fast tokenizer, and continuation chunks of a long document without the dummy
prefix."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from .options import PretokenizeOptions
from .tokenizer import PROBES, SPACE_PROBES, load_hf_tokenizer

# SentencePiece documents are encoded joined, _GROUP to a call, as "doc\x00 doc\x00 doc" (see
# Encoder.encode_documents).
_SEPARATOR = "\x00"
_JOIN = _SEPARATOR + " "
_GROUP = 64


@dataclass(frozen=True)
class EncoderSpec:
    encoder: str  # sentencepiece | hf
    tokenizer_dir: str
    sp_model: str | None
    options: PretokenizeOptions
    eos_id: int | None
    bos_id: int | None
    dtype: str


class Encoder:
    """Lives in each worker: encodes lists of documents to flat id arrays."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        if spec.encoder == "sentencepiece":
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2 as model_pb2

            model_bytes = Path(spec.sp_model or Path(spec.tokenizer_dir) / "tokenizer.model").read_bytes()
            sp = spm.SentencePieceProcessor(model_proto=model_bytes)
            self.encode = lambda texts: sp.encode(texts, num_threads=1)
            self._sp_continued: Any = None  # built on first use: most documents need none

            def encode_continued(texts: list[str]) -> list[list[int]]:
                # Continuation chunks of a long document must not get the dummy "▁" prefix.
                if self._sp_continued is None:
                    proto = model_pb2.ModelProto()
                    proto.ParseFromString(model_bytes)
                    proto.normalizer_spec.add_dummy_prefix = False
                    self._sp_continued = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
                return self._sp_continued.encode(texts, num_threads=1)

            self.encode_continued = encode_continued
            self._separator = self._joined_encoding_is_exact(sp)
        else:
            self._separator = None
            tokenizer = load_hf_tokenizer(Path(spec.tokenizer_dir))
            backend = tokenizer.backend_tokenizer
            self.encode = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
            continued = backend
            try:
                from tokenizers import Tokenizer
                from tokenizers.pre_tokenizers import Metaspace

                if isinstance(backend.pre_tokenizer, Metaspace):
                    continued = Tokenizer.from_str(backend.to_str())
                    continued.pre_tokenizer = Metaspace(
                        replacement="▁", prepend_scheme="never", split=backend.pre_tokenizer.split
                    )
            except Exception:
                continued = backend
            self.encode_continued = lambda texts: [
                e.ids for e in continued.encode_batch(texts, add_special_tokens=False)
            ]

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        """Documents -> one flat id array (EOS after each, BOS before each if asked)."""
        if (
            self._separator is not None
            and not self.spec.options.prepend_bos
            and not any(_SEPARATOR in doc for doc in docs)
        ):
            # Documents joined in groups as "doc1\x00 doc2\x00 doc3": with an identity normalizer
            # "\x00" is a byte-fallback piece no merge can cross, and " " gives each document the
            # dummy prefix, so the ids equal per-document encoding (checked at start). Fewer,
            # longer strings cut SentencePiece's per-call cost and the flattening.
            groups = [_JOIN.join(docs[i : i + _GROUP]) for i in range(0, len(docs), _GROUP)]
            encoded = self.encode(groups)
            separator = self._separator
            for ids in encoded:
                ids.append(separator)
            count = sum(map(len, encoded))
            flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=count)
            ends = flat == separator
            if self.spec.options.append_eos and self.spec.eos_id is not None:
                flat[ends] = self.spec.eos_id
            else:
                flat = flat[~ends]
            return flat.astype(self.spec.dtype)
        return self.flatten(self.encode(docs))

    def _joined_encoding_is_exact(self, sp) -> int | None:
        """The separator id if joined encoding equals per-document encoding on the probes."""
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        spec = proto.normalizer_spec
        if spec.name != "identity" or spec.remove_extra_whitespaces or not spec.add_dummy_prefix:
            return None
        separator_ids = sp.encode(_SEPARATOR + "a")
        separator = sp.piece_to_id("<0x00>")
        if separator not in separator_ids or separator == sp.unk_id():
            return None
        probes = PROBES + SPACE_PROBES + ["  ", " x ", "y  "]
        expected = [i for ids in sp.encode(probes) for i in ids + [separator]]
        joined = sp.encode(_JOIN.join(probes)) + [separator]
        return separator if joined == expected else None

    def flatten(self, encoded: list[list[int]], bos_first: bool = True, eos_last: bool = True) -> np.ndarray:
        opts = self.spec.options
        if opts.append_eos and eos_last and self.spec.eos_id is not None:
            eos = self.spec.eos_id
            for ids in encoded:
                ids.append(eos)
        if opts.prepend_bos and bos_first and self.spec.bos_id is not None:
            for ids in encoded:
                ids.insert(0, self.spec.bos_id)
        count = sum(map(len, encoded))
        return np.fromiter(chain.from_iterable(encoded), dtype=self.spec.dtype, count=count)
