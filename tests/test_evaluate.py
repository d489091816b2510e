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


def test_paired_sign_test_by_hand():
    from lmstack.evaluate import paired_sign_test

    # only discordant problems count: 10 fixed, 0 broken -> p = 2 * (1/2)^10
    before = [False] * 10 + [True] * 5 + [False] * 3
    after = [True] * 10 + [True] * 5 + [False] * 3
    fixed, broken, p = paired_sign_test(before, after)
    assert (fixed, broken) == (10, 0) and abs(p - 2 / 1024) < 1e-12
    # 2 fixed, 1 broken: p = 2 * (C(3,0) + C(3,1)) / 8, capped at 1
    assert paired_sign_test([True, False, False, True], [True, True, True, False]) == (2, 1, 1.0)
    # 6 fixed, 2 broken: p = 2 * (1 + 8 + 28) / 256
    f, b, p = paired_sign_test([False] * 6 + [True] * 2, [True] * 6 + [False] * 2)
    assert (f, b) == (6, 2) and abs(p - 74 / 256) < 1e-12
    assert paired_sign_test([True], [True]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same problems"):
        paired_sign_test([True], [True, False])
