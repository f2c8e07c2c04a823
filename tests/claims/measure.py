"""Prints the per-seed-pair figures behind the claim tests' margins (JSON), e.g. under capped kernels:
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 PYREBASIN_CACHE=$(mktemp -d) python -m tests.claims.measure"""
import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

from tests.claims import _pairs, test_combinability, test_lmc, test_matching, test_repair, test_similarity
from tests.claims import test_stitching_study as test_stitching
from tests.claims import test_transformer_lm

MEASURES = {
    "planted": (test_lmc.measure_planted, lambda: [0, 2, 4, 6]),
    "alignment": (test_lmc.measure_alignment, _pairs.seed_pairs),
    "corrections_vgg_bn": (test_lmc.measure_corrections, _pairs.seed_pairs),
    "weight_mlp": (test_matching.measure_weight_mlp, _pairs.seed_pairs),
    "weight_resnet20_ln": (test_matching.measure_weight_resnet, lambda: _pairs.seed_pairs(3)),
    "activation_mlp": (test_matching.measure_activation_mlp, _pairs.seed_pairs),
    "data_choice_vgg_bn": (test_matching.measure_data_choice_vgg, _pairs.seed_pairs),
    "repair_mlp": (test_repair.measure_repair, _pairs.seed_pairs),
    "cka": (test_similarity.measure_cka, _pairs.seed_pairs),
    "combinability": (lambda p: test_combinability.measure_combinability(p, Path(tempfile.mkdtemp())),
                      _pairs.seed_pairs),
    "transitivity": (test_combinability.measure_transitivity, _pairs.seed_pairs),
    "robustness": (test_combinability.measure_robustness, _pairs.seed_pairs),
    "combination_similarity": (test_combinability.measure_similarity, _pairs.seed_pairs),
    "stitching": (lambda p: test_stitching.measure_study(test_stitching.study(p)), _pairs.seed_pairs),
    "transformer_lm": (test_transformer_lm.measure_lm, lambda: list(test_transformer_lm.PAIRS)),
}


def state_hash(name: str, seed: int) -> str:
    state = _pairs.trained(name, seed)[1]
    return hashlib.sha1(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()[:12]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="*", default=list(MEASURES))
    p.add_argument("--out")
    args = p.parse_args()
    report = {"isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "figures": {}}
    start = time.perf_counter()
    for key in args.only:
        fn, pairs = MEASURES[key]
        t = time.perf_counter()
        report["figures"][key] = {str(q): fn(q) for q in pairs()}
        print(f"{key}: {time.perf_counter() - t:.1f}s", json.dumps(report["figures"][key], default=float), flush=True)
    report["hashes"] = {n: state_hash(n, 0) for n in _pairs.CONFIGS}
    report["seconds"] = time.perf_counter() - start
    text = json.dumps(report, indent=1, default=float)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
