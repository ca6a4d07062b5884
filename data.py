"""
Text data for train_gpt.py: tokenisers, token shards, the default corpus and the batch loader.

  - Encodings: "byte" (UTF-8 bytes, vocab 256: needs nothing, the default) or any tiktoken
    encoding ("gpt2", "cl100k_base", "o200k_base", ...; tiktoken fetches its BPE file once).
  - Shards: <dir>/{train,val}_NNNNNN.bin, each a 64-byte header (magic, version, bytes per
    token, token count, source byte count, vocab size) then the tokens as uint16 (uint32 when
    the vocabulary has more than 65,536 entries), memory-mapped on load. <dir>/meta.json
    names the encoding. A truncated or foreign file is refused with a one-line error.
  - The default corpus: the English text that ships with CPython (the pydoc_data topics and
    the docstrings of the standard library, ~2.2 MB), in a fixed order; every 20th document
    is held out for validation. Built once, cached under data/default-py<version>-byte.
  - `python prepare_data.py prepare --input a.txt b.jsonl c.parquet --encoding gpt2 --out data/mine`
    or `--hf HuggingFaceFW/fineweb-edu --hf_config sample-10BT`: the readers of files and
    datasets, and that command, are in prepare_data.py.
  - TokenLoader: deterministic batches, split across ranks, resumable to the exact sample.
"""

import ast
import glob
import json
import os
import struct
import sys
import sysconfig

import numpy as np

from train_common import UserError

MAGIC = b"DYTTOKS\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQQI")  # magic, version, bytes/token, tokens, source bytes, vocab
HEADER_SIZE = 64                    # HEADER.size rounded up, so the tokens start aligned
DEFAULT_VAL_EVERY = 20              # every 20th document -> validation (5%)
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Encodings

class ByteEncoding:
    """UTF-8 bytes as tokens: vocab 256, no special tokens, bits per byte == bits per token."""
    name = "byte"
    n_vocab = 256
    eot_token = None

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def decode(self, tokens):
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class HFTokenizerEncoding:
    """A Hugging Face tokenizer file (tokenizer.json, e.g. LLaMA's 32,000-token SentencePiece
    BPE) through the optional `tokenizers` package, named hf:PATH. Documents are separated by
    its end-of-sequence token (</s>, <|endoftext|> or <|end_of_text|>, whichever it has)."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"--encoding hf:{path} needs the tokenizers package: pip install tokenizers") from None
        if not os.path.isfile(path):
            raise UserError(f"--encoding hf:{path}: no such file; give the path of a tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:
            raise UserError(f"--encoding hf:{path} is not a tokenizer.json that `tokenizers` reads "
                            f"({type(e).__name__}: {str(e)[:80]})") from None
        self.name = "hf:" + os.path.abspath(path)
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [self.tokenizer.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<|end_of_text|>")]
        self.eot_token = next((i for i in ids if i is not None), None)

    def encode_ordinary(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, tokens):
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False)


def get_encoding(name):
    """The encoding called `name`: 'byte', 'hf:PATH' (a tokenizer.json) or a tiktoken name; an
    encoding object passes through."""
    if not isinstance(name, str):
        return name
    if name == "byte":
        return ByteEncoding()
    if name.startswith("hf:"):
        return HFTokenizerEncoding(name[3:])
    try:
        import tiktoken
        return tiktoken.get_encoding(name)
    except ValueError as e:
        raise UserError(f"unknown encoding {name!r}: {e}; use byte, hf:PATH, gpt2, cl100k_base, ...")
    except Exception as e:
        raise UserError(f"cannot load tiktoken encoding {name!r} ({type(e).__name__}); it needs "
                        "internet once (or TIKTOKEN_CACHE_DIR with its file), or use --encoding byte")


def eot_of(enc):
    """The end-of-text token that separates documents, or None (byte level: a blank line)."""
    return getattr(enc, "eot_token", None)


# ---------------------------------------------------------------------------------------------
# Shards

def dtype_for(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shard(path, tokens, vocab_size, n_bytes=0):
    """Write tokens (any int array) with the header, atomically (tmp + os.replace)."""
    dtype = dtype_for(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids outside [0, {vocab_size}) for {path}")
    header = HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, tokens.size, n_bytes,
                         vocab_size).ljust(HEADER_SIZE, b"\x00")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(tokens.astype(dtype).tobytes())
    os.replace(tmp, path)


def read_header(path):
    """The header of a shard as a dict; UserError naming the file when it is not a valid one."""
    if not os.path.isfile(path):
        raise UserError(f"no token shard at {path}; run `python prepare_data.py prepare` first")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise UserError(f"{path} is not a token shard (bad magic); re-run prepare_data.py prepare")
    magic, version, itemsize, n_tokens, n_bytes, vocab = HEADER.unpack(raw[:HEADER.size])
    if version != VERSION:
        raise UserError(f"{path} has shard version {version}, this code reads {VERSION}; "
                        "re-run prepare_data.py prepare")
    if itemsize not in (2, 4):
        raise UserError(f"{path} has {itemsize} bytes per token (2 or 4 expected); re-run prepare")
    expected = HEADER_SIZE + n_tokens * itemsize
    if size != expected:
        raise UserError(f"{path} is truncated or corrupt: {size} bytes, header says {expected}; "
                        "re-run prepare_data.py prepare")
    return {"itemsize": itemsize, "n_tokens": n_tokens, "n_bytes": n_bytes, "vocab_size": vocab}


def open_shard(path):
    """(tokens as a read-only np.memmap, header)."""
    h = read_header(path)
    dtype = np.uint16 if h["itemsize"] == 2 else np.uint32
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(h["n_tokens"],))
    return tokens, h


def read_meta(data_dir):
    """data_dir/meta.json as a dict; UserError (one line) when it is missing or corrupt.
    (The built-in corpus never gets here broken: default_data_dir rebuilds it.)"""
    meta_path = os.path.join(data_dir, "meta.json")
    fix = (f"prepare it with `python prepare_data.py prepare --input FILES --encoding byte --out "
           f"{data_dir}`, or train on the built-in corpus (--data default)")
    if not os.path.isfile(meta_path):
        raise UserError(f"no prepared data in {data_dir} (missing meta.json); {fix}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        int(meta["vocab_size"]), str(meta["encoding"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UserError(f"{meta_path} is corrupt ({type(e).__name__}); {fix}") from None
    return meta


class TokenDataset:
    """All shards of one split of a prepared directory, checked and memory-mapped."""

    def __init__(self, data_dir, split):
        self.meta = read_meta(data_dir)
        meta_path = os.path.join(data_dir, "meta.json")
        paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
        if not paths:
            raise UserError(f"no {split}_*.bin shards in {data_dir}; re-run prepare_data.py prepare")
        self.paths, self.shards, self.headers = paths, [], []
        for p in paths:
            tokens, h = open_shard(p)
            if h["vocab_size"] != self.meta["vocab_size"]:
                raise UserError(f"{p} has vocab {h['vocab_size']} but {meta_path} says "
                                f"{self.meta['vocab_size']}; re-run prepare_data.py prepare")
            self.shards.append(tokens)
            self.headers.append(h)
        self.vocab_size = int(self.meta["vocab_size"])
        self.encoding = self.meta["encoding"]
        self.n_tokens = sum(h["n_tokens"] for h in self.headers)
        n_bytes = sum(h["n_bytes"] for h in self.headers)
        # source bytes per token, for bits per byte (exact for the byte encoding)
        self.bytes_per_token = n_bytes / self.n_tokens if n_bytes else 1.0

    def chunks(self, seq_len):
        """Number of (seq_len + 1)-token windows per shard (windows never cross shards)."""
        return [max((len(s) - 1) // seq_len, 0) for s in self.shards]


# ---------------------------------------------------------------------------------------------
# Writing shards: documents -> token shards (the default corpus here, files and Hugging Face
# datasets in prepare_data.py)

def prepare(docs, out_dir, encoding="byte", val_every=DEFAULT_VAL_EVERY,
            shard_tokens=100_000_000, max_docs=0, progress=False, max_tokens=0):
    """Tokenise an iterable of document strings into out_dir/{train,val}_NNNNNN.bin.

    Document i goes to validation when i % val_every == 0 (deterministic, spread over the
    corpus). Documents are separated by the encoding's end-of-text token (byte level: a blank
    line). Stops after max_docs documents or once max_tokens tokens are written (0: no cap;
    the document that crosses the cap is kept whole). Returns {split: tokens written}."""
    enc = get_encoding(encoding)
    name = encoding if isinstance(encoding, str) else enc.name
    vocab = enc.n_vocab
    eot = eot_of(enc)
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "train_*.bin")) + \
            glob.glob(os.path.join(out_dir, "val_*.bin")):
        os.remove(old)  # a re-prepare must not mix with shards of an earlier run
    state = {s: {"buf": [], "n": 0, "bytes": 0, "index": 0, "total": 0} for s in ("train", "val")}

    def flush(split):
        st = state[split]
        if st["n"]:
            write_shard(os.path.join(out_dir, f"{split}_{st['index']:06d}.bin"),
                        np.concatenate(st["buf"]), vocab, st["bytes"])
            st["index"] += 1
            st["total"] += st["n"]
            st["buf"], st["n"], st["bytes"] = [], 0, 0

    bar = None
    for i, text in enumerate(docs):
        if max_docs and i >= max_docs:
            break
        if max_tokens and sum(st["total"] + st["n"] for st in state.values()) >= max_tokens:
            break
        if progress and bar is None:  # after the first document: an input error is one line
            from tqdm import tqdm
            bar = tqdm(desc="documents", unit="doc")
        if not text:
            continue
        split = "val" if i % val_every == 0 else "train"
        sep = [eot] if eot is not None else enc.encode_ordinary("\n\n")
        toks = np.asarray(enc.encode_ordinary(text) + sep, dtype=np.int64)
        st = state[split]
        st["buf"].append(toks)
        st["n"] += len(toks)
        st["bytes"] += len(text.encode("utf-8")) + (0 if eot is not None else 2)
        if st["n"] >= shard_tokens:
            flush(split)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for split in state:
        flush(split)
    if not state["val"]["total"] or not state["train"]["total"]:
        raise UserError(f"too few documents for a train and a val split (every {val_every}th "
                        "document is validation); give more input")
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"encoding": name, "vocab_size": vocab, "eot": eot, "val_every": val_every,
                   "tokens": {s: state[s]["total"] for s in state}}, f)
    return {s: state[s]["total"] for s in state}


# ---------------------------------------------------------------------------------------------
# The default corpus

def default_corpus_docs():
    """The documents of the default corpus, in a fixed order: every pydoc_data topic (sorted
    by name), then for each standard-library module (sorted by path, tests left out) its
    docstrings in source order. Same Python version -> same text."""
    from pydoc_data.topics import topics
    docs = [topics[k] for k in sorted(topics)]
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    for path in sorted(files):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []

        def visit(node):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
            for child in ast.iter_child_nodes(node):
                visit(child)
        visit(tree)
        if parts:
            docs.append("\n\n".join(parts))
    return docs


def default_data_dir(cache_root=None):
    """The default corpus as prepared byte-level shards; built on first use (a few seconds)."""
    cache_root = cache_root or os.path.join(HERE, "data")
    out = os.path.join(cache_root, f"default-py{sys.version_info[0]}.{sys.version_info[1]}-byte")
    if not _default_ok(out):
        # missing, or broken (a corrupt meta.json, a truncated shard): it is a cache of text
        # that ships with Python, so rebuild it rather than asking the user to
        import shutil
        tmp = f"{out}.tmp{os.getpid()}"
        prepare(default_corpus_docs(), tmp, "byte")
        if os.path.exists(out) and not _default_ok(out):
            broken = f"{out}.broken{os.getpid()}"
            os.replace(out, broken)
            shutil.rmtree(broken, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _default_ok(out):
    """Whether the cached default corpus is complete and readable (headers only: fast)."""
    try:
        meta = read_meta(out)
        paths = glob.glob(os.path.join(out, "train_*.bin")) + glob.glob(os.path.join(out, "val_*.bin"))
        if not any("train_" in p for p in paths) or not any("val_" in p for p in paths):
            return False
        return all(read_header(p)["vocab_size"] == meta["vocab_size"] for p in paths)
    except UserError:
        return False


def resolve_data_dir(data, cache_root=None):
    """'default' -> the built-in corpus; else a prepared directory (checked by TokenDataset)."""
    if data == "default":
        return default_data_dir(cache_root)
    if not os.path.isdir(data):
        raise UserError(f"no data directory {data}; prepare one with `python prepare_data.py prepare "
                        f"--out {data} --input ...` or use --data default")
    return data


# ---------------------------------------------------------------------------------------------
# The batch loader

class TokenLoader:
    """Training batches: windows of seq_len + 1 tokens (input, next-token target).

    The sequence of windows is a function of (seed, position) only: epoch e visits every
    window once in a permutation seeded by seed + e. A step takes the next global_batch
    windows; rank r's micro-step j takes windows [(r * accum + j) * micro_batch, ... +
    micro_batch) of them, so every world size sees the same set of windows per step, and
    position (windows consumed) is the whole state: state_dict()/load_state_dict() resume
    to the exact window."""

    def __init__(self, dataset, seq_len, micro_batch, accum, rank=0, world_size=1, seed=0,
                 shuffle=True):
        self.ds, self.T, self.B, self.accum = dataset, seq_len, micro_batch, accum
        self.rank, self.world, self.seed, self.shuffle = rank, world_size, seed, shuffle
        counts = dataset.chunks(seq_len)
        self.starts = np.cumsum([0] + counts)
        self.n = int(self.starts[-1])
        if self.n == 0:
            raise UserError(f"the data has fewer than {seq_len + 1} tokens per shard; use a "
                            "shorter --seq_len or more data")
        self.position = 0
        self._perm_epoch, self._perm = None, None

    @property
    def global_batch(self):
        return self.B * self.accum * self.world

    def _window(self, k):
        shard = int(np.searchsorted(self.starts, k, side="right") - 1)
        off = (k - int(self.starts[shard])) * self.T
        w = self.ds.shards[shard][off:off + self.T + 1]
        # A shard whose header is valid can still hold ids >= vocab (a bit flip, a shard of
        # another tokeniser with the same vocab field): the embedding lookup would fail with
        # an IndexError on CPU and a device-side assert on CUDA. Checking each window costs
        # one max over seq_len tokens; scanning whole shards at start-up would cost minutes.
        top = int(w.max()) if len(w) else 0
        if top >= self.ds.vocab_size:
            raise UserError(f"{self.ds.paths[shard]} holds token id {top} at or after token "
                            f"{off}, outside the vocabulary of {self.ds.vocab_size}; the shard "
                            "is corrupt: re-run prepare_data.py prepare")
        return w

    def _window_index(self, g):
        epoch, k = divmod(g, self.n)
        if not self.shuffle:
            return k
        if self._perm_epoch != epoch:
            rng = np.random.default_rng(self.seed + epoch)
            self._perm = rng.permutation(self.n).astype(np.int64)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def next_step(self):
        """This rank's accum micro-batches of one step: [(x, y)] as int64 torch tensors."""
        import torch
        out = []
        for j in range(self.accum):
            first = self.position + (self.rank * self.accum + j) * self.B
            rows = np.stack([self._window(self._window_index(g))
                             for g in range(first, first + self.B)]).astype(np.int64)
            rows = torch.from_numpy(rows)
            out.append((rows[:, :-1], rows[:, 1:]))
        self.position += self.global_batch
        return out

    def state_dict(self):
        return {"position": self.position, "seed": self.seed, "seq_len": self.T}

    def load_state_dict(self, state):
        if state["seq_len"] != self.T or state["seed"] != self.seed:
            raise UserError(f"the checkpoint's data order used seq_len {state['seq_len']} and "
                            f"seed {state['seed']}; resume with the same --seq_len and --seed")
        self.position = state["position"]


def val_windows(dataset, seq_len, max_tokens, rank=0, world_size=1, batch=16):
    """Validation batches for this rank: the first max_tokens of the split in order (the same
    for every run), windows dealt round-robin to ranks. Yields (x, y) int64 tensors."""
    import torch
    loader = TokenLoader(dataset, seq_len, 1, 1, shuffle=False)
    n = min(loader.n, max(1, max_tokens // seq_len))
    mine = list(range(rank, n, world_size))
    for i in range(0, len(mine), batch):
        rows = np.stack([loader._window(k) for k in mine[i:i + batch]]).astype(np.int64)
        rows = torch.from_numpy(rows)
        yield rows[:, :-1], rows[:, 1:]


if __name__ == "__main__":
    # data.py holds what the trainer reads; the commands that write shards are prepare_data.py's
    import sys
    print("error: data preparation is one command now: python prepare_data.py "
          + (" ".join(sys.argv[1:]) or "prepare --help"), file=sys.stderr)
    sys.exit(2)
