"""Token datasets from files: .pt/.safetensors ids ([N, T] or a 1-D stream), UTF-8 text byte-level or with a
tokenizer, and one-line errors for bad files (ids outside the vocabulary, empty, wrong dtype, not UTF-8)."""
import pytest
import torch
from safetensors.torch import save_file

from pyrebasin.tokens import BYTE_VOCAB, chunk_stream, is_token_file, load_tokens, tokens_from_text


def test_files_of_ids(tmp_path):
    ids = torch.randint(0, 50, (6, 9))
    torch.save(ids, tmp_path / "a.pt")
    assert torch.equal(load_tokens(tmp_path / "a.pt", vocab=50), ids)
    save_file({"input_ids": ids.int(), "attention_mask": torch.ones(6, 9, dtype=torch.int8)},
              str(tmp_path / "b.safetensors"))
    both = load_tokens(tmp_path / "b.safetensors")
    assert torch.equal(both["input_ids"], ids) and both["input_ids"].dtype == torch.int64
    assert both["attention_mask"].shape == (6, 9)
    stream = torch.arange(50, dtype=torch.int32)
    torch.save({"tokens": stream}, tmp_path / "s.pt")
    chunks = load_tokens(tmp_path / "s.pt", seq_len=16)
    assert chunks.shape == (3, 16) and torch.equal(chunks.reshape(-1), torch.arange(48))  # tail of 2 dropped
    assert is_token_file(tmp_path / "a.pt") and is_token_file(tmp_path / "t.txt")
    torch.save({"x_train": torch.zeros(2, 3), "y_train": torch.zeros(2)}, tmp_path / "cls.pt")
    assert not is_token_file(tmp_path / "cls.pt")


def test_text_byte_level_and_tokenizer(tmp_path):
    text = "héllo wörld ✓ " * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = load_tokens(tmp_path / "t.txt", seq_len=8, vocab=BYTE_VOCAB)
    raw = list(text.encode("utf-8"))
    assert ids.shape == (len(raw) // 8, 8) and ids.reshape(-1).tolist() == raw[:ids.numel()]
    assert int(ids.max()) > 127   # UTF-8 bytes of é, ö, ✓
    words = tokens_from_text("a b a c " * 4, seq_len=4, tokenizer=lambda s: [ord(w) - 97 for w in s.split()])
    assert words.tolist() == [[0, 1, 0, 2]] * 4


def test_bad_files_are_named(tmp_path):
    torch.save(torch.tensor([[1, 2, 300]]), tmp_path / "big.pt")
    with pytest.raises(ValueError, match=r"big.pt: token ids must lie in \[0, 256\).*\[1, 300\]"):
        load_tokens(tmp_path / "big.pt", vocab=256)
    torch.save(torch.zeros(0, 4, dtype=torch.long), tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty.pt: holds no tokens"):
        load_tokens(tmp_path / "empty.pt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no tokens"):
        load_tokens(tmp_path / "empty.txt", seq_len=4)
    torch.save(torch.randn(3, 4), tmp_path / "float.pt")
    with pytest.raises(TypeError, match="token ids must be an integer tensor, got torch.float32"):
        load_tokens(tmp_path / "float.pt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_tokens(tmp_path / "latin1.txt", seq_len=2)
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ValueError, match="3 tokens are fewer than one sequence of seq_len=8"):
        load_tokens(tmp_path / "short.txt", seq_len=8)
    with pytest.raises(ValueError, match="needs seq_len"):
        load_tokens(tmp_path / "short.txt")
    two = {"a": torch.zeros(2, 3, dtype=torch.long), "b": torch.zeros(2, 3, dtype=torch.long)}
    torch.save(two, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="named one of"):
        load_tokens(tmp_path / "two.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a header")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_tokens(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "missing.txt", seq_len=4)
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        chunk_stream(torch.arange(10), 1)
