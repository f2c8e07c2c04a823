"""Hugging Face model directories (config.json + safetensors shards) as checkpoints: the model built on
the meta device from the local config, its traced spec, streamed alignment and an aligned directory out.

    spec, state_a = prb.hf.load_hf_spec("llama-a")             # no weight read, nothing materialised
    result = prb.hf.align_hf("llama-a", "llama-b", "llama-b-aligned")
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_write
from .lm import model_kwargs
from .shards import ShardedState, index_file, permute_safetensors
from .spec import PermutationSpec
from .streamed_forward import StreamedWeights, empty_parameters, stream_weights_

__all__ = ["is_hf_directory", "hf_config", "hf_model_on_meta", "load_hf_spec", "open_hf_pair",
           "load_hf_model", "streamed_hf_model", "streamed_activation_matching", "save_permuted_hf", "align_hf",
           "checkpoint_dtype", "WEIGHT_SUFFIXES"]

# Files of other weight formats are not copied into an aligned directory: they would hold unaligned weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def is_hf_directory(path: str | os.PathLike) -> bool:
    """True for a folder holding a config.json (a model directory, whatever its weights)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _directory(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} {str(path)!r} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")) and index_file(path) is None:
        raise ValueError(f"{what} {str(path)!r} has no .safetensors weights (convert .bin checkpoints with "
                         "save_pretrained(..., safe_serialization=True))")
    return path


def hf_config(directory: str | os.PathLike):
    """The `transformers` config of a local model directory (never the hub)."""
    from transformers import AutoConfig

    path = _directory(directory, "model directory")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ValueError(f"{path}/config.json: transformers cannot read it ({exc})") from None


def hf_model_on_meta(directory: str | os.PathLike) -> nn.Module:
    """`AutoModelForCausalLM.from_config(config)` built on the meta device: shapes, no weights."""
    from transformers import AutoModelForCausalLM

    config = hf_config(directory)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise ValueError(f"{directory}: no causal-LM class for model_type {config.model_type!r} ({exc})") from None
    return model.eval()


def _token_inputs(model: nn.Module, seq_len: int) -> dict:
    # use_cache=False: a cache object in the outputs cannot be traced (and is not needed)
    return {"input_ids": torch.zeros(1, seq_len, dtype=torch.long, device="meta"), **model_kwargs(model)}


def load_hf_spec(directory: str | os.PathLike, *, seq_len: int = 8) -> tuple[PermutationSpec, ShardedState]:
    """The traced spec of a model directory (model on the meta device, token inputs, caches off) over
    exactly the keys of its safetensors checkpoint, and that checkpoint as a lazy `ShardedState`.

    Tied weights saved once (lm_head tied to the embedding) are left out of the spec; any other key
    the model and the checkpoint disagree on is a ValueError naming it."""
    from .trace import trace_spec

    path = _directory(directory, "model directory")
    state = ShardedState(path)
    model = hf_model_on_meta(path)
    spec = trace_spec(model, _token_inputs(model, seq_len))
    params = model.state_dict(keep_vars=True)
    first = {}
    for k, v in params.items():
        first.setdefault(id(v), k)
    missing = [k for k in spec.axes_to_perm if k not in state]
    untied = [k for k in missing if first[id(params[k])] == k or first[id(params[k])] not in state]
    if untied:
        raise ValueError(f"{path}: the checkpoint lacks {untied[:5]}, which {type(model).__name__} has")
    extra = [k for k in state if k not in spec.axes_to_perm]
    if extra:
        raise ValueError(f"{path}: the checkpoint holds {extra[:5]}, which {type(model).__name__} does not have")
    meta = state.meta()
    wrong = [f"{k} {list(meta[k].shape)} (model: {list(params[k].shape)})" for k in state
             if tuple(meta[k].shape) != tuple(params[k].shape)]
    if wrong:
        raise ValueError(f"{path}: checkpoint shapes differ from config.json's model: {wrong[:3]}")
    return spec.restrict([k for k in spec.axes_to_perm if k in state]), state


def open_hf_pair(dir_a, dir_b, *, seq_len: int = 8) -> tuple[PermutationSpec, ShardedState, ShardedState]:
    """The spec (traced from A's config) and both lazy checkpoints, checked to hold the same keys and shapes."""
    spec, state_a = load_hf_spec(dir_a, seq_len=seq_len)
    state_b = ShardedState(_directory(dir_b, "model directory"))
    ma, mb = state_a.meta(), state_b.meta()
    if set(ma) != set(mb):
        raise ValueError(f"{dir_a} and {dir_b} hold different keys (only in A: {sorted(set(ma) - set(mb))[:3]}, "
                         f"only in B: {sorted(set(mb) - set(ma))[:3]})")
    wrong = [k for k in ma if ma[k].shape != mb[k].shape]
    if wrong:
        raise ValueError(f"{dir_a} and {dir_b} differ in shape at {wrong[:3]} "
                         f"({list(ma[wrong[0]].shape)} vs {list(mb[wrong[0]].shape)})")
    return spec, state_a, state_b


def load_hf_model(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of a local directory with its weights (`from_pretrained`, local files only), in eval mode."""
    from transformers import AutoModelForCausalLM

    path = _directory(directory, "model directory")
    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs).eval()


def checkpoint_dtype(state: ShardedState) -> torch.dtype:
    """The dtype of a checkpoint's floating tensors (the first one's; float32 when it has none)."""
    return next((m.dtype for m in state.meta().values() if m.is_floating_point()), torch.float32)


def streamed_hf_model(directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
                      state: ShardedState | None = None) -> tuple[nn.Module, StreamedWeights]:
    """The causal LM of a local directory built with its parameters on the meta device (buffers such as
    rotary `inv_freq` computed as `from_pretrained` computes them) that reads each module's weights from
    the memory-mapped shards just before the module runs and drops them after it (`streamed_forward`):
    a forward holds one module's weights at a time. `dtype`: the compute dtype (default: the
    checkpoint's). Returns (model in eval mode, its `StreamedWeights`)."""
    from transformers import AutoModelForCausalLM

    path = _directory(directory, "model directory")
    state = ShardedState(path) if state is None else state
    config = hf_config(path)
    dtype = checkpoint_dtype(state) if dtype is None else dtype
    try:
        with empty_parameters():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise ValueError(f"{directory}: no causal-LM class for model_type {config.model_type!r} ({exc})") from None
    model.eval()
    try:
        return model, stream_weights_(model, state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _check_out(out: Path, sources: list[Path], overwrite: bool) -> None:
    for src in sources:
        if out.resolve() == src.resolve():
            raise ValueError(f"out {str(out)!r} is the input directory {str(src)!r}: writing it would replace "
                             "that model; choose another folder")
        if src.resolve() in out.resolve().parents:
            raise ValueError(f"out {str(out)!r} lies inside the input directory {str(src)!r}; choose another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out {str(out)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` onto `out` (an old `out` is moved aside first, then deleted)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def save_permuted_hf(source: str | os.PathLike, spec: PermutationSpec, perms, out: str | os.PathLike, *,
                     max_shard_size: int | str | None = None, progress: bool = True,
                     overwrite: bool = False) -> Path:
    """Write model directory `source` with `perms` applied to its weights as the directory `out`:
    safetensors shards streamed tensor by tensor (source layout and metadata, or `max_shard_size`),
    the index, config.json and every other non-weight file copied. The folder is built beside `out`
    and moved into place when complete, so `out` is never half written."""
    src = _directory(source, "source")
    out = Path(out)
    _check_out(out, [src], overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        permute_safetensors(spec, perms, src, tmp, progress=progress, max_shard_size=max_shard_size)
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_SUFFIXES):
                atomic_write(tmp / f.name, lambda tmp_path, f=f: shutil.copyfile(f, tmp_path))
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def align_hf(dir_a: str | os.PathLike, dir_b: str | os.PathLike, out: str | os.PathLike | None = None, *,
             matching: str = "weight", data=None, forward_dtype: torch.dtype | None = None,
             max_shard_size: int | str | None = None, overwrite: bool = False, progress: bool = True,
             seq_len: int = 8, **options):
    """Align model directory B to A and (given `out`) write the aligned B as a model directory
    (`save_permuted_hf`). Returns the MatchResult.

    matching="weight": streamed weight matching; `options` go to `streamed_weight_matching` (method,
    seed, max_iter, cache_bytes, block_bytes, ...).
    matching="activation": activation matching on token batches `data` (any form `activation_matching`
    reads) with both models run as streamed forwards (`streamed_hf_model`, compute dtype
    `forward_dtype`, default the checkpoint's), so neither model is ever in memory; `options` go to
    `activation_matching` (batch_size, dtype of the moments, max_memory, max_batches, max_iter, ...)."""
    from .matching.streamed import streamed_weight_matching

    if matching not in ("weight", "activation"):
        raise ValueError(f"align_hf: matching must be 'weight' or 'activation', got {matching!r}")
    if matching == "activation" and data is None:
        raise ValueError("align_hf: matching='activation' needs data (token batches)")
    if matching == "weight" and (data is not None or forward_dtype is not None):
        raise ValueError("align_hf: data and forward_dtype are for matching='activation'")
    if out is not None:  # before any work: an output that would replace an input fails now
        _check_out(Path(out), [Path(dir_a), Path(dir_b)], overwrite)
    spec, state_a, state_b = open_hf_pair(dir_a, dir_b, seq_len=seq_len)
    if matching == "weight":
        result = streamed_weight_matching(spec, state_a, state_b, progress=progress, **options)
    else:
        result = streamed_activation_matching(dir_a, dir_b, spec, data, forward_dtype=forward_dtype,
                                              states=(state_a, state_b), progress=progress, **options)
    if out is not None:
        save_permuted_hf(dir_b, spec, result.perms, out, max_shard_size=max_shard_size, progress=progress,
                         overwrite=overwrite)
    return result


def streamed_activation_matching(dir_a, dir_b, spec: PermutationSpec, data, *, forward_dtype=None,
                                 states: tuple[ShardedState, ShardedState] | None = None, **options):
    """`activation_matching` of two model directories run as streamed forwards (`streamed_hf_model`):
    each module's weights are read from the shards when it runs and dropped after, so the memory is
    the moments (bounded by `max_memory=`) and one batch's activations, not the models."""
    from .matching.activation import activation_matching

    state_a, state_b = states if states is not None else (None, None)
    model_a, weights_a = streamed_hf_model(dir_a, dtype=forward_dtype, state=state_a)
    model_b, weights_b = streamed_hf_model(dir_b, dtype=forward_dtype, state=state_b)
    try:
        return activation_matching(model_a, model_b, spec, data, **options)
    finally:
        weights_a.remove()
        weights_b.remove()
