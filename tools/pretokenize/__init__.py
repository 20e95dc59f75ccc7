"""Pre-tokenize a text corpus once into memory-mappable token shards (stage kind `pretokenize`).

Why: the original project re-tokenized its corpus on every launch (rank 0, while the other ranks
waited) and stored 8-byte ids. Here an array of tasks tokenizes the corpus once into raw
little-endian uint16 ids (uint32 when the vocabulary needs it), and every later run reuses them.

How the work is cut:
- Inputs: `.txt` (a document a line, or blank-line separated paragraphs: `txt_documents`),
  `.jsonl` (one JSON object a line) and `.json` (a list of objects), the text under `text_key`.
- Each file is cut at nominal offsets k * piece_bytes, each cut moved forward to the next document
  start, so a piece always holds whole documents and a 500 MB file spreads over many tasks.
  A `.json` file is one piece (it has to be parsed whole; use JSONL for big data).
- Pieces are given to tasks as contiguous runs balanced by bytes, so the concatenation of all
  shards in manifest order is the same token stream whatever the number of tasks.
- A task hands its pieces' documents to worker processes in batches of ~batch_bytes; a document
  longer than chunk_bytes (a single huge line) is encoded in chunks cut at whitespace or sentence
  punctuation, so memory never grows with the size of a file or a line.
- Encoding: with `encoder: auto` a tokenizer that has a tokenizer.model whose pieces map to the same
  ids in the HF tokenizer is encoded with the `sentencepiece` library directly (the original
  project's LlamaTokenizer semantics, and ~8x faster than the HF pipeline); anything else uses the
  HF fast tokenizer. Agreement of the two on a probe set is checked once per tokenizer and stored
  in the manifest (`tokenizer.encoder_check`).

Content-addressed cache (`cache_dir`, default $CHLA_CACHE/pretokenize, else
~/.cache/chla/pretokenize): one entry per piece, keyed by blake2b(tokenizer files, the piece's
bytes (its length and content hash), the options). `<key>.bin` holds the ids, `<key>.json` (written
last, the commit marker) the counts. Output shards are hard links to the entries (a copy when the
cache is on another filesystem). A re-run with nothing changed tokenizes nothing; a changed or
added file re-tokenizes only its changed pieces; a killed task leaves only hidden `.tmp` files,
and a re-run fills in what is missing.

Output directory:
    shard-FFFFF-PPPPP.bin   raw ids of piece P of source file F (documents in file order, EOS after
                            each document by default)
    shard-FFFFF-PPPPP.json  its counts (tokens, documents, bad input, encoder)
    tasks/task-T-of-N.json  what task T did (read by finalize)
    manifest.json           written last: tokenizer fingerprint, dtype, block size, sources with
                            sizes and hashes, per-shard counts, totals, bad-input counts

Modules: options (what changes the ids, how the work is cut), pieces (inputs cut at document
boundaries, spread over tasks), documents (a byte range -> document texts, bad input counted),
tokenizer (identity and encoder choice), encoder and workers (the worker processes), cache (the
content-addressed entries), task (one task, or all in turn), manifest (finalize).
"""

from .documents import documents_of
from .hashing import hash_file
from .manifest import finalize_corpus
from .options import FORMAT_VERSION, MANIFEST, NOT_OPTIONS, Layout, PretokenizeOptions, default_cache_dir
from .pieces import Piece, assign_pieces, expand_inputs, file_format, next_document_start, plan_pieces, work_items
from .task import pretokenize, pretokenize_with_params, run_task, run_task_with_params
from .tokenizer import TokenizerInfo, choose_encoder, load_tokenizer_info, tokenizer_fingerprint

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "NOT_OPTIONS",
    "Layout",
    "Piece",
    "PretokenizeOptions",
    "TokenizerInfo",
    "assign_pieces",
    "choose_encoder",
    "default_cache_dir",
    "documents_of",
    "expand_inputs",
    "file_format",
    "finalize_corpus",
    "hash_file",
    "load_tokenizer_info",
    "next_document_start",
    "plan_pieces",
    "pretokenize",
    "pretokenize_with_params",
    "run_task",
    "run_task_with_params",
    "tokenizer_fingerprint",
    "work_items",
]
