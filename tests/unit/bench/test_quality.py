"""elas-bench quality: two tiny variants for a few steps on the demo corpus; curves, table and plot."""
from __future__ import annotations

import importlib.util
import json

from elas_megatron.bench import quality
from elas_megatron.cli.bench import main

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def test_quality_runs_two_variants_and_reports(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quality", "--tiny", "--variants", "cola,elas", "--elas-warmup", "2", "--steps", "4",
                 "-o", "train.eval_every=2", "--jobs", "2", "--out", str(out)]) == 0
    results = json.loads((out / "quality.json").read_text())
    assert [r["name"] for r in results] == ["60m_cola", "60m_elas_warmup2"]
    for r in results:
        assert r["status"] == "ok"
        assert [c["step"] for c in r["curve"]] == [2, 4]
        assert r["final_tokens"] == 4 * 4 * 32 and r["final_val_ppl"] > 1
    table = (out / "quality.md").read_text()
    assert table in capsys.readouterr().out
    assert "| 60m_elas_warmup2 | elas | 2 | 4 |" in table and "%" in table
    assert (out / "quality.png").exists() == HAVE_MPL
    # the same tables again from the runs on disk, without training
    assert main(["quality", "--tiny", "--variants", "cola,elas", "--elas-warmup", "2", "--steps", "4",
                 "--report-only", "--out", str(out)]) == 0
    assert (out / "quality.md").read_text() == table
    # runs side by side (--jobs 2) give the curves a run alone gives
    alone = tmp_path / "alone"
    assert main(["quality", "--tiny", "--variants", "cola", "--steps", "4", "-o", "train.eval_every=2",
                 "--out", str(alone)]) == 0
    assert json.loads((alone / "quality.json").read_text())[0]["curve"] == results[0]["curve"]


def test_plan_same_everything_but_the_variant(tmp_path):
    runs = quality.plan_runs(sizes=["60m"], variants=["dense", "elas"], elas_warmups=[0, 100], steps=10,
                             out_dir=tmp_path, common=["train.seed=7"])
    assert [r.name for r in runs] == ["60m_dense", "60m_elas_warmup0", "60m_elas_warmup100"]
    strip = [[o for o in r.overrides if not o.startswith(("train.run_dir", "model.dense_warmup"))] for r in runs]
    assert strip[0] == strip[1] == strip[2]
    assert runs[2].configs[-1].endswith("variant/elas.yaml")


def test_gap_and_data_overrides():
    res = [{"size": "60m", "variant": "cola", "final_val_ppl": 20.0},
           {"size": "60m", "variant": "elas", "final_val_ppl": 20.4}, {"size": "60m", "variant": "elas",
                                                                        "final_val_ppl": 21.0}]
    assert abs(quality.final_ppl_gap(res, "60m") - 0.02) < 1e-12
    assert "data.tokenizer=data/demo/tokenizer.model" in quality.data_overrides(None, None, None)
