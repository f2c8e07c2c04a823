"""Model directories for the HF benchmarks: config + safetensors shards + index, written tensor by tensor."""
from __future__ import annotations

import json
from pathlib import Path


def write_dir(out: Path, config, meta: dict, plan: list, tensor) -> None:
    """A model directory from `tensor(key) -> Tensor`, one tensor in memory at a time."""
    from pyrebasin.fileio import atomic_write_text
    from pyrebasin.shards import save_safetensors_streamed

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    for name, keys in plan:
        save_safetensors_streamed(out / name, {k: meta[k] for k in keys}, ((k, tensor(k)) for k in keys),
                                  metadata={"format": "pt"})
    total = sum(m.numel() * m.element_size() for m in meta.values())
    atomic_write_text(out / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: n for n, ks in plan for k in ks}}, indent=2))
