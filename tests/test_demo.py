import json
import os
import re
import subprocess
import sys

import torch

from common import Batches, StudentCNN, load_cifar10, predict
from conftest import ROOT


def test_make_demo_runs_the_whole_pipeline_offline(tmp_path):
    demo = tmp_path / "demo"
    r = subprocess.run(["make", "--no-print-directory", "demo", f"DEMO={demo}", f"PYTHON={sys.executable}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for run in ["teacher", "kd/lam0", "kd/T20_lam1", "kd/T5_lam0.1", "kd/T10_lam0.1", "kd/T20_lam0.1",
                "kd/T2_lam0.5", "kd/T8_lam0.9", "continual/fe", "continual/ft", "continual/lwf", "continual/joint",
                "continual/ft-all"]:
        for f in ("config.json", "history.json", "model.pt", "loss.png", "accuracy.png", "result.json"):
            assert (demo / run / f).exists(), f"{run}/{f}"
    kd = (demo / "tables" / "kd_table.md").read_text()
    assert len(re.findall(r"^\| (Teacher|Student|KD)[^|]*\|[^|]*\|[^|]*\| \d+\.\d\d \| \d+\.\d\d \|$", kd, re.M)) == 6
    continual = (demo / "tables" / "continual_table.md").read_text()
    assert len(re.findall(r"\| \d+\.\d\d \| \d+\.\d\d \|$", continual, re.M)) == 10
    fe = json.load(open(demo / "continual" / "fe" / "result.json"))
    assert fe["old_test_acc"] == fe["old_test_acc_before"]
    md = (demo / "report.md").read_text()
    assert "Missing" not in md and (demo / "report.pdf").stat().st_size > 10000
    for image in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (demo / image).exists(), image
    assert "Knowledge distillation: final accuracy" in r.stdout  # the closing summary
    assert not list(demo.rglob("checkpoint.pt"))  # finished runs keep no checkpoint
    for table in ("kd_table", "kd_sweep", "continual_table"):
        assert (demo / "tables" / f"{table}.csv").exists() and (demo / "tables" / f"{table}.tex").exists()
    assert "Observations" in md and "Teacher weights: sha256 " in md

    # the demo shows each method's known character (README, "make demo")
    result = lambda run: json.load(open(demo / run / "result.json"))  # noqa: E731
    teacher = result("teacher")["test_acc"]
    students = {name: result(f"kd/{name}")["test_acc"] for name in ("lam0", "T20_lam1", "T5_lam0.1", "T10_lam0.1", "T20_lam0.1")}
    assert teacher >= max(students.values()) + 20, (teacher, students)  # a teacher well above its students
    cifar = load_cifar10(str(demo / "data"), torch.device("cpu"))
    n_test = len(cifar["test"][1])
    # a student's float16 model.pt gives back the accuracy it was trained to, within one test image
    config = json.load(open(demo / "kd" / "T20_lam0.1" / "config.json"))
    model = StudentCNN(bn=bool(config["bn"]), dropout=config["dropout"])
    model.load_state_dict({k: v.float() for k, v in torch.load(demo / "kd" / "T20_lam0.1" / "model.pt", weights_only=True).items()})
    logits = predict(model, Batches(cifar["test"][0], batch_size=100))
    acc = 100 * (logits.argmax(1) == cifar["test"][1]).float().mean().item()
    assert abs(acc - students["T20_lam0.1"]) <= 100 / n_test, (acc, students["T20_lam0.1"])
    p = students["lam0"] / 100
    noise = 2 * 100 * (2 * p * (1 - p) / n_test) ** 0.5  # two standard errors of a difference of two accuracies
    for name in ("T5_lam0.1", "T10_lam0.1", "T20_lam0.1"):
        assert students[name] >= students["lam0"] - noise, (name, students, noise)  # KD level with λ=0, within noise
    cl = {m: result(f"continual/{m}") for m in ("fe", "ft", "lwf", "joint", "ft-all")}
    before = cl["fe"]["old_test_acc_before"]
    assert cl["fe"]["old_test_acc"] == before  # feature extraction keeps the old task exactly
    assert cl["ft"]["old_test_acc"] < before - 15  # fine-tuning conv4_x + conv5_x at 100% forgets
    assert cl["lwf"]["old_test_acc"] > cl["ft-all"]["old_test_acc"] + 5  # LwF keeps more than fine-tuning at its rates
    assert cl["joint"]["old_test_acc"] >= cl["lwf"]["old_test_acc"]  # joint training: the upper reference
