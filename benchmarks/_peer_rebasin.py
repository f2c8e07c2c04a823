"""Runs rebasin==0.0.47 (the peer) on two zoo models in its own process; prints timings as JSON.

Usage (from weight_matching_ratios.py): python _peer_rebasin.py ARCH_JSON STATE_A STATE_B OUT.
The peer dir is on PYTHONPATH only here, so the peer can never change the parent's packages.
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file, save_file

import pyrebasin as prb


def main():
    arch, path_a, path_b, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(int(arch.pop("threads", 1)))
    from rebasin import PermutationCoordinateDescent

    example = torch.randn(*arch.pop("input_shape"))
    model_a, model_b = prb.zoo.build(arch["arch"], **arch["kwargs"]), prb.zoo.build(arch["arch"], **arch["kwargs"])
    model_a.load_state_dict(load_file(path_a))
    model_b.load_state_dict(load_file(path_b))
    model_a.eval(), model_b.eval()
    torch.manual_seed(0)  # rebasin draws its group order from the global RNG
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(model_a, model_b, example)
    t1, c1 = time.perf_counter(), time.process_time()
    sweeps = 0
    loop = range(100)
    for _ in loop:
        sweeps += 1
        from tqdm import tqdm
        if not pcd._calculate_permutations_step(tqdm(disable=True)):
            break
    t2, c2 = time.perf_counter(), time.process_time()
    pcd.apply_permutations()
    save_file({k: v.contiguous() for k, v in model_b.state_dict().items()}, out)
    print(json.dumps({"init_s": t1 - t0, "match_s": t2 - t1, "match_cpu_s": c2 - c1, "sweeps": sweeps}))


if __name__ == "__main__":
    main()
