"""prb.experiments.stitching on mnist1d MLPs, checked over several seed pairs: least-squares stitches
keep the accuracy at every layer, identity stitches do not; its report section and JSON round trip."""
import json

import pytest

import pyrebasin as prb
from tests.claims._pairs import CONFIGS, seed_pairs, trained
from tests.experiments.test_stitching_study import check_png

pytestmark = [pytest.mark.slow, pytest.mark.claims]
CONFIGS_RUN = (("affine", "least_squares"), ("affine", "identity"), ("permutation", "least_squares"))


def study(seeds):
    for s in seeds:
        trained("mlp", s)  # fills the model cache the study reads, trained at one thread
    _, kw, epochs = CONFIGS["mlp"]
    return prb.experiments.stitching("mlp", seeds=seeds, configs=CONFIGS_RUN, stitch_epochs=1, progress=False,
                                     train_config=prb.train.TrainConfig(epochs=epochs), **kw)


def measure_study(st) -> dict:
    return {"ls_min": min(st.relative_accuracy("affine", "least_squares", trained=True)),
            "identity_max": max(st.relative_accuracy("affine", "identity", trained=False)),
            "cka_min": min(st.cka.values()), "cca_min": min(st.cca.values()), "r2_min": min(st.r2.values()),
            "accuracy_end": st.accuracy_end}


def test_study_least_squares_keeps_accuracy_identity_does_not(tmp_path):
    studies = [study(p) for p in seed_pairs()]
    s = studies[0]
    assert s.layers == ["norms.0", "norms.1", "norms.2"] and len(s.rows) == 3 * 3 * 2
    table = s.table()
    assert table.count("\n") == 2 + len(s.layers) - 1 and "`norms.1`" in table and "→" in table
    assert prb.experiments.StitchingStudy.from_dict(json.loads(json.dumps(s.to_dict()))) == s  # JSON round trip
    md, d, pngs = prb.experiments.stitching_section(tmp_path, study=s)
    assert md.startswith("## Stitching") and "relative accuracy" in md and pngs[0].name in md
    assert "mlp (width=128, depth=3) seed 0" in md
    assert d["layers"] == s.layers and json.loads(json.dumps(d))["cka"] == s.cka
    check_png(pngs[0])
    # measured, pairs (0,1) (2,3) (4,5) (6,7), AVX512 | AVX2 | DEFAULT: least-squares stitch, worst layer's
    # relative accuracy .946 .988 .998 .980 | .948 .988 .998 .978 | .952 .988 .998 .973; identity stitch,
    # best layer's .185-.369; CKA .952-.969, SVCCA .725-.744, R² .953-.960; end net accuracy .557-.585
    for st in studies:
        r = measure_study(st)
        assert r["ls_min"] > 0.9 and r["identity_max"] < 0.5, r  # the paper's claim; worst margin .046
        assert r["cka_min"] > 0.3 and r["cca_min"] > 0 and r["r2_min"] > 0.5, r
        assert all(v <= 1.0 for m in (st.cka, st.cca, st.r2) for v in m.values())
        assert 0.4 < r["accuracy_end"] < 1
