"""data.py: shard header, corrupt files, offline tiktoken prepare, the deterministic loader."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import prepare_data  # noqa: E402
from train_common import UserError  # noqa: E402


def tiny_tiktoken():
    """A tiktoken Encoding built offline: the 256 bytes plus a few merges and an end token."""
    import tiktoken
    ranks = {bytes([i]): i for i in range(256)}
    for merge in [b"th", b"he", b"the", b" t", b"in", b"er"]:
        ranks[merge] = len(ranks)
    return tiktoken.Encoding("tiny", pat_str=r"""'s|'t| ?\w+| ?[^\s\w]+|\s+""",
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})


@pytest.mark.parametrize("vocab, dtype", [(256, np.uint16), (70000, np.uint32)])
def test_shard_header_round_trip(tmp_path, vocab, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab, 1000)
    path = str(tmp_path / "train_000000.bin")
    data.write_shard(path, tokens, vocab, n_bytes=1234)
    got, header = data.open_shard(path)
    assert got.dtype == dtype and np.array_equal(got, tokens)
    assert header == {"itemsize": np.dtype(dtype).itemsize, "n_tokens": 1000,
                      "n_bytes": 1234, "vocab_size": vocab}


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    data.write_shard(path, np.arange(100), 256)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(UserError, match="train_000000.bin is truncated"):
        data.open_shard(path)
    foreign = tmp_path / "val_000000.bin"
    foreign.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(UserError, match="val_000000.bin is not a token shard"):
        data.open_shard(str(foreign))
    with pytest.raises(UserError, match="no token shard"):
        data.open_shard(str(tmp_path / "nope.bin"))


def test_prepare_with_offline_tiktoken(tmp_path):
    enc = tiny_tiktoken()
    txt = tmp_path / "a.txt"
    txt.write_text("the other thing in there " * 20)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"doc {i}: the weather in there"})
                               for i in range(30)))
    out = str(tmp_path / "prepared")
    docs = prepare_data._iter_local([str(txt), str(jsonl)])
    counts = data.prepare(docs, out, enc, val_every=10, shard_tokens=100)
    train, val = data.TokenDataset(out, "train"), data.TokenDataset(out, "val")
    assert train.n_tokens == counts["train"] and val.n_tokens == counts["val"]
    assert len(train.paths) > 1  # shard_tokens=100 splits the train split
    assert train.vocab_size == enc.n_vocab and train.bytes_per_token > 1.0
    toks = np.concatenate([np.asarray(s) for s in train.shards]).tolist()
    assert enc.eot_token in toks and "weather in there" in enc.decode(toks)
    with pytest.raises(UserError, match="no such input file"):
        list(prepare_data._iter_local([str(tmp_path / "missing.txt")]))


def _dataset(tmp_path, n=5000):
    out = str(tmp_path / "d")
    os.makedirs(out)
    rng = np.random.default_rng(0)
    data.write_shard(os.path.join(out, "train_000000.bin"), rng.integers(0, 256, n), 256, n)
    data.write_shard(os.path.join(out, "train_000001.bin"), rng.integers(0, 256, n), 256, n)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"encoding": "byte", "vocab_size": 256}, f)
    return data.TokenDataset(out, "train")


def test_loader_is_deterministic_rank_split_and_resumable(tmp_path):
    ds = _dataset(tmp_path)
    T = 16

    def rows(loader, steps):
        return [np.concatenate([x.numpy() for x, _ in loader.next_step()]) for _ in range(steps)]

    one = data.TokenLoader(ds, T, micro_batch=2, accum=4, seed=3)
    ref = rows(one, 50)  # 50 steps x 8 windows: more than one epoch of 622 windows
    x, y = data.TokenLoader(ds, T, 2, 4, seed=3).next_step()[0]
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())  # y is x shifted by one
    # two ranks with accum 2 see exactly the same windows per step as one rank with accum 4
    r0 = data.TokenLoader(ds, T, 2, 2, rank=0, world_size=2, seed=3)
    r1 = data.TokenLoader(ds, T, 2, 2, rank=1, world_size=2, seed=3)
    for step, (a, b) in enumerate(zip(rows(r0, 50), rows(r1, 50))):
        assert np.array_equal(np.concatenate([a, b]), ref[step])
    # resume from a saved position
    fresh = data.TokenLoader(ds, T, 2, 4, seed=3)
    fresh.load_state_dict({**one.state_dict(), "position": 20 * 8})
    assert all(np.array_equal(a, b) for a, b in zip(rows(fresh, 30), ref[20:]))
    with pytest.raises(UserError, match="same --seq_len"):
        data.TokenLoader(ds, 8, 2, 4, seed=3).load_state_dict(one.state_dict())


def test_default_corpus_is_offline_and_split(tmp_path):
    d = data.default_data_dir()  # cached under the repo's data/ after the first build
    train, val = data.TokenDataset(d, "train"), data.TokenDataset(d, "val")
    assert train.encoding == "byte" and train.vocab_size == 256
    assert train.n_tokens > 1_500_000 and 0.02 < val.n_tokens / train.n_tokens < 0.1


def test_prepare_a_directory_and_its_overlap_report(tmp_path, capsys, monkeypatch):
    from train_common import main_guard
    src = tmp_path / "docs"
    (src / "b").mkdir(parents=True)
    for i in range(40):  # documents in nested folders; only text files are read
        (src / ("b" if i % 2 else "") / f"doc{i:02d}.rst.txt").write_text(
            f"Document {i} has a line long enough to count in the overlap report.\n"
            "This shared sentence appears in every single document of the corpus.\n")
    (src / "image.png").write_bytes(b"\x89PNG not text")
    out = tmp_path / "prepared"
    main_guard(prepare_data.main, ["prepare", "--input", str(src), "--encoding", "byte", "--out", str(out)])
    assert "train and" in capsys.readouterr().out
    files = prepare_data.expand_inputs([str(src)])
    assert len(files) == 40 and files == sorted(files) and all(f.endswith(".txt") for f in files)
    val = data.TokenDataset(str(out), "val")
    text = np.asarray(val.shards[0], dtype=np.uint8).tobytes().decode()
    # by document, every 20th in sorted path order (b/doc01, ..., b/doc39, doc00, ...): whole
    # documents, the first and the 21st
    assert text.count("Document") == 2 and "Document 1 has" in text and "Document 0 has" in text
    (line,) = prepare_data.overlap_report(str(out))
    assert "3 distinct validation lines" in line and "33.3% of them also occur" in line
    # bad input is one line naming the path
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.png").write_bytes(b"x")
    for argv, needle in ((["--input", str(empty)], f"{empty} holds no .txt"),
                         (["--input", str(tmp_path / "missing")], "no such input file")):
        with pytest.raises(SystemExit) as e:
            main_guard(prepare_data.main, ["prepare", *argv, "--encoding", "byte", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err

    def unreadable(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(prepare_data, "open", unreadable, raising=False)  # root reads any file: fake it
    with pytest.raises(SystemExit):
        main_guard(prepare_data.main, ["prepare", "--input", str(src), "--encoding", "byte", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot read {files[0]}: Permission denied; fix its permissions or leave it out of --input"


def test_one_way_to_prepare_data_and_no_import_circle(tmp_path):
    """prepare_data.py is the one command; data.py (what the trainer reads) does not import it,
    and the old spellings name the new one in one line."""
    code = "import sys, data; assert 'prepare_data' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    for cmd in (["data.py", "prepare", "--default", "--out", str(tmp_path / "a")],
                ["train_gpt.py", "prepare", "--default", "--out", str(tmp_path / "b")]):
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (cmd, p.stderr)
        assert "python prepare_data.py prepare --default --out" in lines[0], lines
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    out = tmp_path / "c"
    p = subprocess.run([sys.executable, "prepare_data.py", "prepare", "--default", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count("wrote ") == 1, p.stdout + p.stderr  # runs once


def sentencepiece_style_tokenizer(path, text, vocab=300):
    """A LLaMA-style tokenizer.json (BPE with <unk>, <s>, </s>) trained offline on `text`."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, decoders, trainers
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(path))
    return tok


def test_prepare_and_train_with_a_hugging_face_tokenizer(tmp_path, capsys):
    """--encoding hf:PATH: the LLaMA presets' kind of vocabulary, end to end: prepare with a
    tokenizer.json, train the GPT on it (its vocabulary sized from the data), sample text back,
    and cap a stream at --max_tokens."""
    import train_gpt
    from train_common import main_guard
    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok_path = tmp_path / "tokenizer.json"
    tok = sentencepiece_style_tokenizer(tok_path, text)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:02d}.txt").write_text(f"document {i}: " + text[: 200 + 5 * i])
    out = tmp_path / "hf"
    main_guard(prepare_data.main, ["prepare", "--input", str(src), "--encoding", f"hf:{tok_path}", "--out", str(out)])
    train = data.TokenDataset(str(out), "train")
    assert train.vocab_size == tok.get_vocab_size() and train.meta["eot"] == tok.token_to_id("</s>")
    assert train.meta["encoding"] == f"hf:{tok_path}"
    toks = np.concatenate([np.asarray(s) for s in train.shards]).tolist()
    enc = data.get_encoding(train.meta["encoding"])
    assert "quick brown fox" in enc.decode(toks) and toks.count(tok.token_to_id("</s>")) == 38
    run = tmp_path / "run"
    train_gpt.main(["--data", str(out), "--dim", "32", "--n_layer", "1", "--n_head", "2", "--n_kv_head", "2",
                    "--seq_len", "32", "--micro_batch", "2", "--global_batch_tokens", "64", "--max_steps", "2",
                    "--warmup_steps", "1", "--eval_tokens", "256", "--sample_tokens", "0", "--vocab_size", "0",
                    "--out_dir", str(run), "--device", "cpu"])
    capsys.readouterr()
    train_gpt.main(["sample", "--ckpt", str(run / "ckpt.pt"), "--prompt", "the quick", "--max_new_tokens", "5",
                    "--device", "cpu"])
    assert capsys.readouterr().out.startswith("the quick")
    # eval on a corpus of another encoding: one line naming both
    with pytest.raises(SystemExit):
        main_guard(train_gpt.main, ["eval", "--ckpt", str(run), "--data", "default"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoded with byte" in err and f"hf:{tok_path}" in err, err
    # a token cap stops a (streamed) corpus early
    capped = tmp_path / "capped"
    main_guard(prepare_data.main, ["prepare", "--input", str(src), "--encoding", f"hf:{tok_path}",
                                   "--out", str(capped), "--max_tokens", "600"])
    meta = json.load(open(capped / "meta.json"))
    total = sum(meta["tokens"].values())
    assert 600 <= total < 600 + 200 and total < sum(train.meta["tokens"].values())
    # bad input: one line naming the fix
    capsys.readouterr()
    for bad, needle in ((f"hf:{tmp_path / 'nope.json'}", "no such file"), (f"hf:{src / '00.txt'}", "is not a tokenizer.json")):
        with pytest.raises(SystemExit):
            main_guard(prepare_data.main, ["prepare", "--input", str(src), "--encoding", bad, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
