"""Runs the original Git Re-Basin `weight_matching` (JAX, samuela/git-re-basin) on two state dicts saved as
.npz, in its own venv; prints the timing and the perms as JSON. Never imports pyrebasin or torch.

Usage (from weight_matching_ratios.py): PY _peer_gitrebasin.py SRC_DIR AXES_JSON A.npz B.npz REPEAT
SRC_DIR is the repository's src/ (GIT_REBASIN_SRC); its utils.py needs flax only for `rngmix`, which is
given here so that its weight_matching.py runs unchanged.
"""
import json
import sys
import time
import types

import numpy as np


def main():
    src, axes_json, path_a, path_b, repeat = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    import jax.numpy as jnp
    from jax import random

    utils = types.ModuleType("utils")
    utils.rngmix = lambda rng, x: random.fold_in(rng, hash(x))  # the repo's definition, without flax
    sys.modules["utils"] = utils
    sys.path.insert(0, src)
    import weight_matching as wm

    sweeps = [0]

    class CountingRandom:  # counts the sweeps: the loop draws one group order per sweep
        def __getattr__(self, name):
            return getattr(random, name)

        def permutation(self, *args):
            sweeps[0] += 1
            return random.permutation(*args)

    wm.random = CountingRandom()
    with open(axes_json) as f:
        axes = {k: tuple(v) for k, v in json.load(f).items()}
    ps = wm.permutation_spec_from_axes_to_perm(axes)
    a, b = np.load(path_a), np.load(path_b)
    params_a = {k: jnp.asarray(a[k]) for k in axes}
    params_b = {k: jnp.asarray(b[k]) for k in axes}
    best, cpu, perm = float("inf"), float("inf"), None
    for _ in range(repeat):
        sweeps[0] = 0
        t, c = time.perf_counter(), time.process_time()
        perm = wm.weight_matching(random.PRNGKey(0), ps, params_a, params_b, silent=True)
        perm = {k: np.asarray(v) for k, v in perm.items()}
        best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
    print(json.dumps({"match_s": best, "match_cpu_s": cpu, "sweeps": sweeps[0],
                      "perms": {k: v.tolist() for k, v in perm.items()}}))


if __name__ == "__main__":
    main()
