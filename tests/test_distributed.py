"""torch.distributed (gloo, 2 local processes on 127.0.0.1): all-reduced moments equal the moments
of the whole data; shards cover the range; perms broadcast; rows gathered in rank order."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyrebasin.distributed import all_reduce_moments_, broadcast_perms, gather_rows, rank_and_world, shard_range
from pyrebasin.moments import CrossMoments


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x, y, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        rows = shard_range(len(x))
        m = CrossMoments(x.shape[1], y.shape[1]).update(x[rows.start:rows.stop], y[rows.start:rows.stop])
        all_reduce_moments_(m)
        perms = broadcast_perms({"P": torch.randperm(5, generator=torch.Generator().manual_seed(rank))})
        gathered = gather_rows(torch.full((len(rows),), float(rank)))
        results[rank] = (m.corr(), float(m.count), perms["P"], gathered, rank_and_world())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_reduce_to_the_whole_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(101, 6, generator=g), torch.randn(101, 4, generator=g)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), x, y, results), nprocs=2, join=True)
        results = dict(results)
    whole = CrossMoments(6, 4).update(x, y)
    for rank in (0, 1):
        corr, count, perm, gathered, rw = results[rank]
        assert count == 101 and rw == (rank, 2)
        torch.testing.assert_close(corr, whole.corr(), atol=1e-12, rtol=0)
        assert torch.equal(perm, torch.randperm(5, generator=torch.Generator().manual_seed(0)))
        assert gathered.tolist() == [0.0] * 51 + [1.0] * 50


def test_shard_range_partitions():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 3 outside world of size 2"):
        shard_range(5, 3, 2)


# --- the library's own flows under 2 ranks: each equals its single-process run ---

def _flows(group=None, rank=0, world=1):
    """activation_matching on this rank's shard; combinations and a REPAIRed curve on the same data everywhere."""
    from tests.test_matching_weight import model_state
    import pyrebasin as prb
    model, state_a = model_state("mlp", seed=0)
    _, state_b = model_state("mlp", seed=1)
    spec = model.permutation_spec()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(203, 12, generator=g), torch.randint(0, 5, (203,), generator=g)
    rows = shard_range(len(x), rank, world)
    match = prb.activation_matching(model, model, spec, x[rows.start:rows.stop], state_a=state_a,
                                    state_b=state_b, batch_size=32, group=group)
    coef = prb.sample_coefficients(state_a, 37, "uniform(-0.5, 1.5)", seed=3)
    comb = prb.evaluate_combinations(model, state_a, state_b, coef, (x, y), chunk=8, batch_size=64,
                                     return_logits=True, group=group)
    curve = prb.interpolate(model, state_a, state_b, {"train": (x, y), "test": (x[:50], y[:50])}, 7, chunk=2,
                            repair=True, group=group)
    return match, comb, curve


def _flow_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from pyrebasin.matching import costs
        costs.SPLIT_MIN_BYTES = 0   # split these small weight matchings by group, as a large model's
        match, comb, curve = _flows(None, rank, world)
        local, _, _ = _flows(False, rank, world)   # opt-out: this rank's shard alone, no collective
        try:   # an empty shard on one rank is an error on every rank, not a hang
            import pyrebasin as prb
            from tests.test_matching_weight import model_state
            model, state = model_state("mlp")
            x = torch.randn(8, 12)
            prb.activation_matching(model, model, model.permutation_spec(), x[:8 if rank == 0 else 0], state_a=state,
                                    state_b=state)
            error = None
        except ValueError as e:
            error = str(e)
        try:   # ranks disagreeing on the work: an error on every rank, never silently wrong rows
            prb.evaluate_combinations(model, state, state, [0.5] * (4 + rank), (x[:4], torch.zeros(4).long()))
            mismatch = None
        except ValueError as e:
            mismatch = str(e)
        seen = []   # the points this rank evaluated: its whole chunks only
        prb.interpolate(model, state, state, (x, torch.zeros(8).long()), 9, chunk=2,
                        correction=lambda st, t: seen.append(t) or st)
        results[rank] = (match.perms, match.objective, comb.loss, comb.accuracy, comb.logits, curve.to_dict(),
                         local.perms, error, mismatch, seen, _more_flows(None, rank, world), _more_errors(rank))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_run_the_flows_as_one_process():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_flow_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert rank_and_world() == (0, 1)   # this process never joined a group: single-process runs below
    match, comb, curve = _flows()
    for rank in (0, 1):
        perms, objective, loss, acc, logits, curve_d, local_perms, error, mismatch, seen, _, _ = results[rank]
        assert perms.keys() == match.perms.keys()
        assert all(torch.equal(perms[p], match.perms[p]) for p in perms)
        # float64 sums in another order: equal to rounding only
        torch.testing.assert_close(torch.tensor(objective), torch.tensor(match.objective), rtol=1e-10, atol=0)
        assert torch.equal(loss, comb.loss) and torch.equal(acc, comb.accuracy) and torch.equal(logits, comb.logits)
        assert curve_d == curve.to_dict()
        assert error is not None and "rank 1: activation_matching: data is empty (0 rows)" in error
        assert mismatch is not None and "rank(s) [1] passed another number of states" in mismatch
        ts = torch.linspace(0, 1, 9, dtype=torch.float64).tolist()
        assert seen == (ts[:6] if rank == 0 else ts[6:])   # 5 chunks of 2: ranks take 3 and 2
    # group=False ran each rank's shard alone, as a process outside any group does
    for rank in (0, 1):
        alone, _, _ = _flows(None, rank, 2)
        assert all(torch.equal(results[rank][6][p], alone.perms[p]) for p in alone.perms)
    # weight matching, REPAIR/RESET statistics on shards, maps (below)
    one = _more_flows()
    for rank in (0, 1):
        got, errors = results[rank][10:]
        for key in ("mlp", "resnet20", "transformer", "maps", "plane", "cmap", "robustness", "transitivity", "lm"):
            _same(got[key], one[key])   # whole groups / pairs / rows per rank: bit for bit
        for key in ("stats", "reset", "repair"):
            _same(got[key], one[key], exact=False)   # float64 sums of the shards: equal to rounding
            _same(got[key], results[0][10][key])     # and the same bits on every rank
        assert "rank 1: statistics data is empty (0 rows)" in errors[0]
        assert "weight_matching: rank(s) [1] passed other arguments than rank 0" in errors[1]


def test_group_must_be_a_process_group():
    import pyrebasin as prb
    from tests.test_matching_weight import model_state
    model, state = model_state("mlp")
    with pytest.raises(TypeError, match="group must be None, False or a torch.distributed ProcessGroup, got 'world'"):
        prb.evaluate_combinations(model, state, state, [0.5], (torch.randn(4, 12), torch.zeros(4).long()),
                                  group="world")


# --- weight matching, REPAIR/RESET statistics and the connectivity maps under 2 ranks ---

class TinyLM(torch.nn.Module):
    """Logits [B, T, V] of token ids [B, T]."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, vocab)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.emb(input_ids)))


def _more_flows(group=None, rank=0, world=1):
    """Weight matching of three zoo pairs; REPAIR/RESET statistics on this rank's shard; maps of 3 models."""
    from tests.test_matching_weight import model_state
    import pyrebasin as prb
    from pyrebasin.maps import loss_plane, pairwise_barriers
    from pyrebasin.repair import endpoint_stats, repair, reset_bn
    out = {}
    for name in ("mlp", "resnet20", "transformer"):
        model, a = model_state(name, seed=0)
        _, b = model_state(name, seed=1)
        r = prb.weight_matching(model.permutation_spec(), a, b, group=group)
        out[name] = (r.perms, r.objective, r.iterations, r.phase_starts)
    model, a = model_state("mlp_bn", seed=0)
    _, b = model_state("mlp_bn", seed=1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(192, 12, generator=g)
    rows = shard_range(len(x), rank, world)   # 96 rows = 3 batches of 32 on each of 2 ranks
    shard = x[rows.start:rows.stop]
    st = endpoint_stats(model, a, b, shard, batch_size=32, group=group)
    out["stats"] = (st.mean_a, st.std_a, st.mean_b, st.std_b)
    out["reset"] = reset_bn(model, a, shard, batch_size=32, group=group)
    out["repair"] = repair(model, a, b, 0.4, shard, batch_size=32, group=group)
    mlp, s0 = model_state("mlp", seed=0)
    states = [s0] + [model_state("mlp", seed=s)[1] for s in (1, 2)]
    data = (torch.randn(40, 12, generator=g), torch.randint(0, 5, (40,), generator=g))
    bars, curves = pairwise_barriers(mlp, states, data, ts=5, align="weight", group=group)
    out["maps"] = (bars, {k: c.to_dict() for k, c in curves.items()})
    out["plane"] = loss_plane(mlp, *states, data, grid=3, group=group).to_dict()
    out["cmap"] = prb.connectivity_map(mlp, states, data, ts=3, group=group).to_dict()
    from pyrebasin.lm import NextTokenLoss
    torch.manual_seed(3)   # a causal LM's next-token objective: 2 chunks, then 1 state (rank 1 has no chunk)
    lm = TinyLM()
    la, lb = lm.state_dict(), {k: v + 0.1 for k, v in lm.state_dict().items()}
    ids = torch.randint(0, 11, (6, 5), generator=g)
    out["lm"] = (prb.interpolate(lm, la, lb, ids, 3, chunk=2, group=group).to_dict(),
                 prb.evaluate_combinations(lm, la, lb, [0.5], ids, loss=NextTokenLoss(), group=group).accuracy)
    if group is not False:   # the studies split their rows / curves over the default group
        from pyrebasin.experiments.robustness import robustness
        from pyrebasin.experiments.transitivity import transitivity
        spec = mlp.permutation_spec()
        out["robustness"] = robustness(mlp, spec, s0, states[1], data, qs=(0.0, 0.5), noise=(0.1,), n=4, ts=3).to_dict()
        out["transitivity"] = transitivity(mlp, spec, *states, data, ts=3).to_dict()
    return out


def _more_errors(rank):
    """Calls that are bad on one rank only: the same ValueError on every rank, never a hang."""
    import pyrebasin as prb
    from pyrebasin.repair import endpoint_stats
    from tests.test_matching_weight import model_state
    model, a = model_state("mlp_bn")
    errors = []
    for call in (lambda: endpoint_stats(model, a, a, torch.randn(8 if rank == 0 else 0, 12)),
                 lambda: prb.weight_matching(model.permutation_spec(), a, a, seed=rank)):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def _same(x, y, exact=True):
    """Nested dicts/lists/tuples of tensors and numbers: equal bit for bit (or to 1e-10 relative)."""
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _same(x[k], y[k], exact)
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            _same(u, v, exact)
    elif isinstance(x, torch.Tensor):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    else:
        assert x == y


RANK_SCRIPT = """import os, sys
os.chdir(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]))   # each rank its own working folder
from pyrebasin.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_cli_under_torchrun_writes_on_rank_0_only(tmp_path):
    # `pyrebasin interpolate --align weight --repair` unchanged under torchrun: the outputs (relative
    # paths, so each rank's would land in its own folder) exist on rank 0 only, equal to one process's.
    import json
    import subprocess
    import sys
    from pathlib import Path

    from pyrebasin.cli import main
    from pyrebasin.io import save_state
    from pyrebasin.zoo import resolve_arch
    kwargs = {"in_features": 12, "width": 16, "depth": 2, "classes": 5}
    for seed, name in ((0, "A.safetensors"), (1, "B.pt")):
        torch.manual_seed(seed)
        save_state(resolve_arch("mlp", kwargs).state_dict(), tmp_path / name)
    g = torch.Generator().manual_seed(0)
    torch.save({"x_train": torch.randn(64, 12, generator=g), "y_train": torch.randint(0, 5, (64,), generator=g),
                "x_test": torch.randn(32, 12, generator=g), "y_test": torch.randint(0, 5, (32,), generator=g)},
               tmp_path / "data.pt")
    (tmp_path / "run_rank.py").write_text(RANK_SCRIPT)
    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()
    args = ["interpolate", "--arch", "mlp", "--arch-kwargs", json.dumps(kwargs), "--a", str(tmp_path / "A.safetensors"),
            "--b", str(tmp_path / "B.pt"), "--data", str(tmp_path / "data.pt"), "--ts", "5", "--align", "weight",
            "--repair"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "logs"   # torchrun's own per-rank copies of stdout/stderr (--redirects 3)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--redirects", "3", "--log-dir", str(logs), str(tmp_path / "run_rank.py"), str(tmp_path),
                        *args, "--out", "out"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "rank0" / "out").iterdir()) == ["curve.json", "curve.png"]
    assert list((tmp_path / "rank1").iterdir()) == []          # rank 1 wrote nothing
    out = {int(f.parent.name): f.read_text() for f in logs.rglob("stdout.log")}
    err = {int(f.parent.name): f.read_text() for f in logs.rglob("stderr.log")}
    assert "loss barrier" in out[0] and out[1] == "", out     # rank 1 printed nothing
    assert "interpolate" in err[0] and "weight matching" in err[0]
    assert "interpolate" not in err[1] and "weight matching" not in err[1], err[1]   # progress: rank 0 only
    assert main(args + ["--out", str(tmp_path / "single"), "--no-progress"]) == 0
    got, one = (json.loads((tmp_path / d / "curve.json").read_text()) for d in ("rank0/out", "single"))
    assert got["barriers"] == one["barriers"]
    assert {k: v for k, v in got["curve"].items() if k != "meta"} == {k: v for k, v in one["curve"].items() if k != "meta"}


def test_owners_balance_work_deterministically():
    from pyrebasin.distributed import owners
    work = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 3.0, "e": 1.0}
    assert owners(work, 1) == dict.fromkeys(work, 0)
    got = owners(work, 2)
    assert got == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1} and list(got) == list(work)   # largest first, to the lighter
    loads = [sum(w for k, w in work.items() if got[k] == r) for r in (0, 1)]
    assert loads == [8.0, 8.0]


def test_discard_writes_checks_the_target_and_writes_nothing(tmp_path):
    from pyrebasin.fileio import atomic_write_text, discard_writes
    with discard_writes():
        assert atomic_write_text(tmp_path / "new" / "x.txt", "hi") == tmp_path / "new" / "x.txt"
        with pytest.raises(IsADirectoryError, match="it is a directory"):
            atomic_write_text(tmp_path, "hi")
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(tmp_path / "x.txt", "hi")   # outside the block: written
    assert (tmp_path / "x.txt").read_text() == "hi"
