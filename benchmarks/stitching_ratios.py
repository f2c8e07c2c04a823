"""Streamed representation statistics vs the materialised textbook formulas, measured in ONE run:
linear CKA from PairMoments vs N×N Gram matrices, least-squares stitching init from moments vs
torch.linalg.lstsq on the N×C activations. Prints time ratios and the memory each one holds.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/stitching_ratios.py [--n 4000] [--c 256]
"""
from __future__ import annotations

import argparse
import time

import torch

from pyrebasin import similarity as S


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def _center_gram(k):  # Kornblith et al.'s center_gram: O(N²), no N×N centring matrix product
    means = k.mean(0)
    return k - means[None, :] - means[:, None] + means.mean()


def cka_gram(x, y):
    """The peer: Kornblith et al.'s `cka(gram_linear(x), gram_linear(y))` with N×N Gram matrices."""
    k, l = _center_gram(x @ x.T), _center_gram(y @ y.T)
    return float((k * l).sum() / (k.norm() * l.norm()))


def cka_features(x, y):
    """The floor: their `feature_space_linear_cka` on the whole (materialised) activations at once."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((x.T @ y).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="samples")
    ap.add_argument("--c", type=int, default=256, help="channels of each representation")
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.c, generator=g)
    y = torch.relu(x @ torch.randn(args.c, args.c, generator=g) / args.c**0.5) + 0.1 * torch.randn(args.n, args.c, generator=g)
    mib = lambda elems, itemsize=8: elems * itemsize / 2**20  # noqa: E731

    t_stream, m = best_of(lambda: S.PairMoments.of(x, y, batch_size=args.batch))
    t_cka, cka = best_of(lambda: S.linear_cka(m))
    t_gram, cka_ref = best_of(lambda: cka_gram(x.double(), y.double()), repeat=1)
    t_feat, _ = best_of(lambda: cka_features(x.double(), y.double()))
    print(f"linear CKA, N={args.n}, C={args.c}: streamed {cka:.6f} vs Gram {cka_ref:.6f} (|diff| {abs(cka - cka_ref):.1e})")
    print(f"  time  streamed (moments {t_stream * 1e3:.1f} ms + finalise {t_cka * 1e3:.1f} ms): / Gram (peer) "
          f"{(t_stream + t_cka) / t_gram:.3f}, / one-shot feature space (floor) {(t_stream + t_cka) / t_feat:.2f}")
    print(f"  state streamed {mib(3 * args.c**2):.1f} MiB (3 C×C float64) vs Gram {mib(2 * args.n**2):.1f} MiB (2 N×N float64)"
          f" = {3 * args.c**2 / (2 * args.n**2):.4f}")

    t_fit, fit = best_of(lambda: S.linear_fit(m))
    xd, yd = x.double(), y.double()
    t_lstsq, sol = best_of(lambda: torch.linalg.lstsq(torch.cat([xd, torch.ones(args.n, 1, dtype=xd.dtype)], 1), yd).solution)
    err = float((fit.weight.T - sol[:-1]).abs().max())
    print(f"least-squares init: from moments (finalise) {t_fit * 1e3:.1f} ms vs lstsq on N×C {t_lstsq * 1e3:.1f} ms"
          f" = {t_fit / t_lstsq:.3f};  with streaming: {(t_stream + t_fit) / t_lstsq:.3f};  max |ΔW| {err:.1e}")
    print(f"  state moments {mib(2 * args.c**2):.1f} MiB vs activations {mib(2 * args.n * args.c, 4):.1f} MiB (float32)"
          f" + the lstsq copy {mib(args.n * (2 * args.c + 1)):.1f} MiB")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
