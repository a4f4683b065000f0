import json
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_make_demo_runs_the_whole_pipeline_offline(tmp_path):
    demo = tmp_path / "demo"
    r = subprocess.run(["make", "--no-print-directory", "demo", f"DEMO={demo}", f"PYTHON={sys.executable}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for run in ["teacher", "kd/lam0", "kd/T20_lam1", "kd/T5_lam0.1", "kd/T10_lam0.1", "kd/T20_lam0.1",
                "kd/T2_lam0.5", "kd/T8_lam0.9", "continual/fe", "continual/ft", "continual/lwf"]:
        for f in ("config.json", "history.json", "model.pt", "loss.png", "accuracy.png", "result.json"):
            assert (demo / run / f).exists(), f"{run}/{f}"
    kd = (demo / "tables" / "kd_table.md").read_text()
    assert len(re.findall(r"^\| (Teacher|Student|KD)[^|]*\|[^|]*\|[^|]*\| \d+\.\d\d \| \d+\.\d\d \|$", kd, re.M)) == 6
    continual = (demo / "tables" / "continual_table.md").read_text()
    assert len(re.findall(r"\| \d+\.\d\d \| \d+\.\d\d \|$", continual, re.M)) == 6
    fe = json.load(open(demo / "continual" / "fe" / "result.json"))
    assert fe["old_test_acc"] == fe["old_test_acc_before"]
    md = (demo / "report.md").read_text()
    assert "Missing" not in md and (demo / "report.pdf").stat().st_size > 10000
    for image in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (demo / image).exists(), image
    assert "Knowledge distillation: final accuracy" in r.stdout  # the closing summary
