"""
Make token shards from text, and check them (data.py reads them; the default run needs none):

    python prepare_data.py prepare --input a.txt b.jsonl c.parquet DIR --encoding gpt2 --out data/mine
    python prepare_data.py prepare --hf HuggingFaceFW/fineweb-edu --hf_config sample-10BT --out ...
    python prepare_data.py overlap data/pydocs --against default

Inputs: .txt files (one document each), .jsonl and .parquet (a document per row, its
--text_field), directories of them (read recursively in sorted path order), or a Hugging Face
dataset, streamed (needs `datasets` and internet). data.prepare() tokenises the documents and
splits them by document into train and val shards.
"""

import json
import os

import numpy as np

from data import (DEFAULT_VAL_EVERY, TokenDataset, default_corpus_docs, get_encoding, prepare,
                  resolve_data_dir)
from train_common import UserError, _Parser

# ---------------------------------------------------------------------------------------------
# Documents from files and datasets

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand_inputs(paths):
    """The files that --input names: a file as given, a directory as every .txt, .jsonl and
    .parquet file under it (recursively), sorted by path so that the documents' order, and
    with it the train/val split, does not depend on the file system."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                       if n.endswith(TEXT_SUFFIXES))
        if not found:
            raise UserError(f"{path} holds no .txt, .jsonl or .parquet files; point --input at "
                            "text files or a directory of them")
        files += found
    return files


def _iter_local(paths, text_field="text"):
    """The documents of local files, in order. Every path is checked before the first is
    read, so that a typo fails at once, not after an hour of tokenising."""
    files = expand_inputs(paths)
    for path in files:
        if not os.path.exists(path):
            raise UserError(f"no such input file {path}")
        if not os.access(path, os.R_OK):
            raise UserError(f"cannot read {path}: permission denied; fix its permissions or "
                            "leave it out of --input")
    return _read_all(files, text_field)


def _read_all(files, text_field):
    for path in files:
        try:
            yield from _read_local(path, text_field)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}; fix its permissions or "
                            "leave it out of --input") from None


def _read_local(path, text_field):
    """The documents of one local file."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)[text_field]
                    except (ValueError, KeyError):
                        raise UserError(f"{path} line {i + 1}: not JSON with a "
                                        f"{text_field!r} field (see --text_field)")
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading parquet needs pyarrow: pip install pyarrow")
        table = pq.ParquetFile(path)
        for batch in table.iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()
    else:
        raise UserError(f"{path}: expected a .txt, .jsonl or .parquet file")


def _iter_hf(name, config=None, split="train", text_field="text"):
    try:
        import datasets
    except ImportError:
        raise UserError("--hf needs the `datasets` package (pip install datasets) and internet")
    # streaming: FineWeb-edu / The Pile are far larger than a disk needs to hold
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise UserError(f"cannot open Hugging Face dataset {name!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150] if str(e) else ''}); check the name, "
                        "--hf_config and the internet connection")
    for row in ds:
        if text_field not in row:
            raise UserError(f"{name} rows have no {text_field!r} field; see --text_field")
        yield row[text_field]


# ---------------------------------------------------------------------------------------------
# Overlap between splits and datasets: how much of a validation split is text seen in training

def split_lines(data_dir, split, min_chars=40):
    """The distinct lines (stripped, at least min_chars long) of one split of a prepared
    directory, decoded from its shards. Short lines (blank, markup, a lone `}`) repeat in any
    corpus and say nothing about leaked text, so they are left out."""
    ds = TokenDataset(data_dir, split)
    enc = get_encoding(ds.encoding)
    lines = set()
    for shard in ds.shards:
        if ds.encoding == "byte":  # 10M tokens: decode as one buffer, not token by token
            text = np.asarray(shard, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")
        else:
            text = enc.decode(np.asarray(shard).tolist())
        lines.update(line.strip() for line in text.splitlines() if len(line.strip()) >= min_chars)
    return lines


def overlap_report(data_dir, against=(), min_chars=40):
    """Lines of text: the share of data_dir's validation lines that also occur in its train
    split, and for each directory in `against` the share found anywhere in it and the share
    of its validation lines found in data_dir's train split. Returns the lines of the report."""
    val, train = split_lines(data_dir, "val", min_chars), split_lines(data_dir, "train", min_chars)
    share = lambda a, b: len(a & b) / max(len(a), 1)
    out = [f"{data_dir}: {len(val):,} distinct validation lines of >= {min_chars} characters; "
           f"{share(val, train):.1%} of them also occur in its train split"]
    for other in against:
        other_dir = resolve_data_dir(other)
        other_val = split_lines(other_dir, "val", min_chars)
        other_all = other_val | split_lines(other_dir, "train", min_chars)
        out.append(f"  against {other}: {share(val, other_all):.1%} of them occur in {other} "
                   f"(train or val); {share(other_val, train):.1%} of {other}'s {len(other_val):,} "
                   f"validation lines occur in {data_dir}'s train split")
    return out


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = _Parser(prog="prepare_data.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise text into shards")
    p.add_argument("--input", nargs="*", default=[], help=".txt / .jsonl / .parquet files, or "
                   "directories of them (read recursively, in sorted order)")
    p.add_argument("--hf", default=None, help="a Hugging Face dataset, e.g. "
                   "HuggingFaceFW/fineweb-edu or monology/pile-uncopyrighted")
    p.add_argument("--hf_config", default=None, help="e.g. sample-10BT for FineWeb-edu")
    p.add_argument("--hf_split", default="train")
    p.add_argument("--default", action="store_true", help="the built-in CPython-docs corpus")
    p.add_argument("--text_field", default="text")
    p.add_argument("--encoding", default=None, help="byte, hf:PATH (a tokenizer.json, e.g. "
                   "LLaMA's; needs `tokenizers`), gpt2, cl100k_base, o200k_base, ... "
                   "(default: byte with --default, which then works offline; else gpt2)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val_every", type=int, default=DEFAULT_VAL_EVERY,
                   help="every Nth document goes to validation")
    p.add_argument("--shard_tokens", type=int, default=100_000_000)
    p.add_argument("--max_docs", type=int, default=0, help="stop after this many (0: all)")
    p.add_argument("--max_tokens", type=int, default=0, help="stop once this many tokens are written "
                   "(0: all); a streamed dataset is read no further")
    p = sub.add_parser("overlap", help="how much of a prepared dir's validation text occurs "
                       "in its train split (and in other prepared dirs)")
    p.add_argument("data_dir", help="a prepared directory, or 'default'")
    p.add_argument("--against", nargs="*", default=[], help="other prepared dirs, or 'default'")
    p.add_argument("--min_chars", type=int, default=40, help="lines shorter than this are ignored")
    args = parser.parse_args(argv)
    if args.command == "overlap":
        for line in overlap_report(resolve_data_dir(args.data_dir), args.against, args.min_chars):
            print(line)
        return
    sources = sum([bool(args.input), bool(args.hf), args.default])
    if sources != 1:
        parser.error("give exactly one of --input FILES, --hf NAME, --default")
    if args.encoding is None:  # gpt2 needs tiktoken's BPE file (internet once); byte needs nothing
        args.encoding = "byte" if args.default else "gpt2"
    if args.default:
        docs = default_corpus_docs()
    elif args.hf:
        docs = _iter_hf(args.hf, args.hf_config, args.hf_split, args.text_field)
    else:
        docs = _iter_local(args.input, args.text_field)
    counts = prepare(docs, args.out, args.encoding, args.val_every, args.shard_tokens,
                     args.max_docs, progress=True, max_tokens=args.max_tokens)
    print(f"wrote {counts['train']:,} train and {counts['val']:,} val tokens to {args.out}")


if __name__ == "__main__":
    from train_common import main_guard
    main_guard(main)
