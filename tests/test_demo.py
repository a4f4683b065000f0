"""make demo, run once for the whole suite (the `demo` fixture), and what a newcomer gets from it."""
import json
import re

import pypdf
import torch

from common import Batches, StudentCNN, load_cifar10, predict
from conftest import appendix_page, pdf_text

RUNS = ["teacher", "kd/lam0", "kd/T20_lam1", "kd/T5_lam0.1", "kd/T10_lam0.1", "kd/T20_lam0.1", "kd/T2_lam0.5",
        "kd/T8_lam0.9", "continual/fe", "continual/ft", "continual/lwf", "continual/joint", "continual/ft-all"]


def result(demo, run):
    return json.load(open(demo / run / "result.json"))


def test_make_demo_runs_the_whole_pipeline_offline(demo):
    path, r = demo
    for run in RUNS:
        for f in ("config.json", "history.json", "model.pt", "curves.png", "result.json"):
            assert (path / run / f).exists(), f"{run}/{f}"
    assert not list(path.rglob("checkpoint.pt"))  # finished runs keep no checkpoint
    for table in ("teacher_changes", "teacher_accuracy", "kd_student", "kd_soft_targets", "kd_table", "kd_sweep",
                  "continual_table", "finetune_layers"):  # the setup tables are report.typ's, from the configs
        assert all((path / "tables" / f"{table}.{ext}").exists() for ext in ("md", "tex")), table
    assert all((path / "tables" / f"{t}.csv").exists() for t in ("kd_table", "kd_sweep", "continual_table"))
    assert "Knowledge distillation: final accuracy" in r.stdout  # the closing summary
    assert re.findall(r"^\(report\.py: \d+ s\)$", r.stdout, re.M)  # every step in one process, timed


def test_the_demo_tables_hold_the_runs_numbers(demo):
    path, _ = demo
    kd = (path / "tables" / "kd_table.md").read_text()
    assert len(re.findall(r"^\| (Teacher|Student|KD)[^|]*\|[^|]*\|[^|]*\| \d+\.\d\d \| \d+\.\d\d \|$", kd, re.M)) == 6
    assert f"| KD 3 | 20 | 0.1 | {result(path, 'kd/T20_lam0.1')['train_acc']:.2f} | " in kd
    continual = (path / "tables" / "continual_table.md").read_text()
    assert len(re.findall(r"\| \d+\.\d\d \| \d+\.\d\d \|$", continual, re.M)) == 10


def test_the_demo_shows_each_methods_character(demo):
    """README, "make demo". The demo's test set has 100 images: one binomial standard error of an accuracy is at
    most 5 points, so the orderings below, each at least 10 points apart in the demo, are 2 standard errors or more."""
    path, _ = demo
    teacher = result(path, "teacher")["test_acc"]
    students = {name: result(path, f"kd/{name}")["test_acc"]
                for name in ("lam0", "T20_lam1", "T5_lam0.1", "T10_lam0.1", "T20_lam0.1")}
    assert teacher >= max(students.values()) + 20, (teacher, students)  # a teacher well above its students
    n_test = result(path, "teacher")["test_images"]
    p = students["lam0"] / 100
    noise = 2 * 100 * (2 * p * (1 - p) / n_test) ** 0.5  # two standard errors of a difference of two accuracies
    for name in ("T5_lam0.1", "T10_lam0.1", "T20_lam0.1"):
        assert students[name] >= students["lam0"] - noise, (name, students, noise)  # KD level with λ=0, within noise
    cl = {m: result(path, f"continual/{m}") for m in ("fe", "ft", "lwf", "joint", "ft-all")}
    before = cl["fe"]["old_test_acc_before"]
    assert cl["fe"]["old_test_acc"] == before == teacher  # feature extraction keeps the old task exactly
    assert cl["ft"]["old_test_acc"] < before - 15  # fine-tuning conv4_x + conv5_x at 100% forgets
    assert cl["lwf"]["old_test_acc"] > cl["ft-all"]["old_test_acc"] + 5  # LwF keeps more than fine-tuning at its rates
    assert cl["joint"]["old_test_acc"] >= cl["lwf"]["old_test_acc"]  # joint training: the upper reference
    lam0 = result(path, "continual/lwf_lam0")  # LwF with its old-task term off: what the term buys
    assert cl["lwf"]["old_test_acc"] > lam0["old_test_acc"] + 10


def test_a_students_float16_weights_give_back_its_accuracy(demo):
    path, _ = demo
    cifar = load_cifar10(str(path / "data"), torch.device("cpu"))
    config = json.load(open(path / "kd" / "T20_lam0.1" / "config.json"))
    model = StudentCNN(bn=bool(config["bn"]), dropout=config["dropout"])
    state = torch.load(path / "kd" / "T20_lam0.1" / "model.pt", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    logits = predict(model, Batches(cifar["test"][0], batch_size=100))
    acc = 100 * (logits.argmax(1) == cifar["test"][1]).float().mean().item()
    assert abs(acc - result(path, "kd/T20_lam0.1")["test_acc"]) <= 100 / len(cifar["test"][1])  # within one image


def test_the_demos_report_is_a_hand_in(demo):
    path, _ = demo
    pages, start = pdf_text(path / "report.pdf"), appendix_page(path)
    assert start - 1 <= 12, f"{start - 1} pages before the code appendix"
    assert all(float(p.mediabox.height) > float(p.mediabox.width) for p in pypdf.PdfReader(path / "report.pdf").pages)
    body = "\n".join(pages[:start - 1])
    assert not re.findall(r"\b[A-Z][A-Z_]{2,}=|\bout/|\[\[|channels_last|lock-step", body)
    head = "\n".join(pages).split("from common import")[0]  # up to the appendix's first import: q1a's docstring too
    assert not re.findall(r"\b[A-Z][A-Z_]{2,}=|\bout/|\[\[", head)
    assert "These runs did not use the real data" in re.sub(r"\s+", " ", body)  # the synthetic data is said to be
    text = " ".join(pages)
    for name in ("kd_table", "continual_table", "teacher_accuracy", "kd_sweep"):
        for line in (path / "tables" / f"{name}.md").read_text().splitlines()[2:]:
            for number in re.findall(r"\d+\.\d\d", line):
                assert number in text, (name, number)
