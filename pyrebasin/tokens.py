"""Token datasets from files, for language models: ids stored in .pt/.safetensors ([N, T] sequences, or a
1-D stream cut into sequences of `seq_len`), or a UTF-8 text file tokenised byte-level (ids 0..255) or by
a tokenizer. Bad files are ValueError/TypeError naming the file, the key, the dtype or the ids' range."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .io import first_line

__all__ = ["load_tokens", "tokens_from_text", "chunk_stream", "is_token_file", "TOKEN_KEYS", "BYTE_VOCAB"]

TOKEN_KEYS = ("input_ids", "ids", "tokens")   # where a file of several tensors keeps its ids
BYTE_VOCAB = 256
_INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32)
_TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors")


def is_token_file(path: str | os.PathLike) -> bool:
    """True for a text file, or a .pt/.safetensors file that holds token ids (no x_train/y_train pair)."""
    path = Path(path)
    if path.suffix not in _TENSOR_SUFFIXES:
        return True
    try:
        tensors = _read_tensors(path)
    except ValueError:
        return False
    return "x_train" not in tensors


def chunk_stream(ids: torch.Tensor, seq_len: int, where: str = "tokens") -> torch.Tensor:
    """A 1-D stream of ids as [len // seq_len, seq_len] sequences (the incomplete tail dropped)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (a next-token target needs two tokens), got {seq_len!r}")
    if ids.dim() != 1:
        raise ValueError(f"{where}: a stream of ids must be 1-D, got shape {list(ids.shape)}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{where}: {ids.numel()} tokens are fewer than one sequence of seq_len={seq_len}")
    return ids[:n * seq_len].reshape(n, seq_len)


def tokens_from_text(text: str, *, seq_len: int, tokenizer: Callable | None = None,
                     where: str = "text") -> torch.Tensor:
    """[N, seq_len] int64 ids of `text`: its UTF-8 bytes (ids 0..255) when `tokenizer` is None, else
    `tokenizer(text)` — a callable returning a list of ids, or an object with `.encode` (HF tokenizers)."""
    if tokenizer is None:
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long() if text else \
            torch.zeros(0, dtype=torch.long)
    else:
        encode = getattr(tokenizer, "encode", tokenizer)
        if not callable(encode):
            raise TypeError(f"tokenizer must be callable or have .encode, got {type(tokenizer).__name__}")
        out = encode(text)
        out = out["input_ids"] if isinstance(out, Mapping) else out
        ids = torch.as_tensor(out, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError(f"{where} holds no tokens (empty text)")
    return chunk_stream(ids, seq_len, where)


def _read_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable PyTorch file ({first_line(exc)})") from None
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}; expected a tensor of token ids or a dict of tensors")
    return dict(obj)


def _ids_of(tensors: dict, path: Path, key: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if key is not None:
        if key not in tensors:
            raise ValueError(f"{path}: no tensor {key!r} (has {sorted(tensors)[:8]})")
        name = key
    elif "" in tensors:
        name = ""
    else:
        named = [k for k in TOKEN_KEYS if k in tensors]
        if named:
            name = named[0]
        elif len(tensors) == 1:
            name = next(iter(tensors))
        else:
            raise ValueError(f"{path}: holds {sorted(tensors)[:8]}; token ids must be the only tensor or be "
                             f"named one of {list(TOKEN_KEYS)} (or pass key=)")
    ids = tensors[name]
    mask = tensors.get("attention_mask")
    label = f"{path}" + (f"[{name!r}]" if name else "")
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{label}: is a {type(ids).__name__}, not a tensor of token ids")
    if ids.dtype not in _INTEGER:
        raise TypeError(f"{label}: token ids must be an integer tensor, got {ids.dtype}"
                        + (" (logits or embeddings? store the ids)" if ids.is_floating_point() else ""))
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        raise ValueError(f"{path}: attention_mask must have the ids' shape {list(ids.shape)}, got "
                         f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    return ids, mask


def load_tokens(path: str | os.PathLike, *, seq_len: int | None = None, vocab: int | None = None,
                tokenizer: Callable | None = None, key: str | None = None):
    """Token sequences from a file, as int64 ids [N, T] (or a dict with `input_ids` and `attention_mask`
    when the file stores a mask next to its ids).

    - `.pt` / `.pth` / `.safetensors`: a tensor of ids, or a dict whose ids are the only tensor or sit
      under `key` / one of TOKEN_KEYS. 2-D ids are sequences as stored (`seq_len` unused); 1-D ids are a
      stream cut into sequences of `seq_len` (required; the incomplete tail dropped).
    - any other file: UTF-8 text, tokenised byte-level (ids 0..255, `BYTE_VOCAB`) unless `tokenizer` is
      given (a callable or an object with `.encode`), cut into sequences of `seq_len` (required).

    `vocab`: the model's vocabulary size; ids outside [0, vocab) are a ValueError naming their range.
    Empty files, non-integer ids, an unreadable file or text that is not UTF-8 are errors naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    mask = None
    if path.suffix in _TENSOR_SUFFIXES:
        ids, mask = _ids_of(_read_tensors(path), path, key)
        if ids.numel() == 0:
            raise ValueError(f"{path}: holds no tokens (shape {list(ids.shape)})")
        ids = ids.long()
        if ids.dim() == 1:
            if seq_len is None:
                raise ValueError(f"{path}: a 1-D stream of {ids.numel()} ids needs seq_len to cut it into sequences")
            ids = chunk_stream(ids, seq_len, str(path))
            mask = None if mask is None else chunk_stream(mask, seq_len, str(path))
        elif ids.dim() == 2:
            if ids.shape[1] < 2:
                raise ValueError(f"{path}: sequences of {ids.shape[1]} token(s) have no next-token target")
        else:
            raise ValueError(f"{path}: token ids must be [sequences, tokens] or a 1-D stream, got shape "
                             f"{list(ids.shape)}")
    else:
        if seq_len is None:
            raise ValueError(f"{path}: a text file needs seq_len to cut its tokens into sequences")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                             "pass token ids in a .pt/.safetensors file instead") from None
        ids = tokens_from_text(text, seq_len=seq_len, tokenizer=tokenizer, where=str(path))
    if vocab is not None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{path}: token ids must lie in [0, {vocab}) (the model's vocabulary), got range "
                             f"[{lo}, {hi}]" + (" (byte-level text needs a vocabulary of at least 256)"
                                                if path.suffix not in _TENSOR_SUFFIXES and tokenizer is None else ""))
    if mask is not None:
        return {"input_ids": ids, "attention_mask": mask.long()}
    return ids
