"""`lmstack eval --task ppl`: perplexity and bits per byte against transformers' loss."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from lmstack.evaluate import perplexity, read_texts
from lmstack.model.loading import load_model
from lmstack.tokenizer import Tokenizer
from tests.fixtures import make_tiny_hf
from tests.tok_fixtures import build_test_tokenizer


def test_perplexity_matches_transformers(tmp_path):
    hf = make_tiny_hf("llama", tmp_path / "m", vocab_size=320)
    build_test_tokenizer(tmp_path / "tok", "chatml")
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, tmp_path / "m" / f.name)
    tok = Tokenizer.from_dir(tmp_path / "m")
    texts = ["Hello world, 12 + 30 = 42.", "你好世界 and some more words here"]
    r = perplexity(load_model(tmp_path / "m", dtype=torch.float32), tok, texts, max_len=512)
    nll = tokens = 0.0
    for t in texts:
        ids = torch.tensor([tok.encode(t)])
        with torch.no_grad():
            loss = hf(ids, labels=ids).loss.item()  # mean over len - 1 predicted tokens
        nll += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert r["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)


def test_read_texts_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_texts(tmp_path / "missing.txt")
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: missing column 'text'"):
        read_texts(f)
