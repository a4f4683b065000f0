"""make report on results written here in the runs' own formats: the PDF, its tables, its code, its words."""
import builtins
import json
import os
import re
import shutil

import pytest

import q1a_teacher as q1a
import q1b_kd as q1b
import q2_continual as q2
import report
from conftest import ROOT, appendix_page, pdf_text

METHOD_ACC = {"fe": (93.0, 60.0), "ft": (40.0, 80.0), "lwf": (75.0, 70.0), "joint": (91.0, 78.0), "ft-all": (30.0, 82.0),
              "lam0": (35.0, 81.0)}


def write_run(folder, config, history, result):
    os.makedirs(folder, exist_ok=True)
    for name, obj in (("config", config), ("history", history), ("result", result)):
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(obj, f)


def history(epochs, acc, extra=lambda e: {}):
    """Epoch 0 (before training) to `epochs`, the last at `acc`; the lr's cosine at 0 after the last."""
    return [{"epoch": e, "lr": 0.1 * (1 - e / epochs), "train_loss": 2.0 / (e + 1), "test_loss": 2.2 / (e + 1),
             "train_acc": acc - 3 + e, "test_acc": acc - epochs + e, **extra(e)} for e in range(epochs + 1)]


def fake_out(out, seeds=2, epochs=3, teacher=94.0, student=lambda k, i: 60.0 + 2 * k + 1.5 * i, methods=None,
             gap=lambda k: 10.0, agree=lambda k, acc: acc + 2, n_test=10000, n_train=50000, before=93.0, sweep=True):
    """A finished teacher, the KD table's five students, a 2x2 sweep and the five Q2 methods with LwF at λo = 0 (100
    subjects), each with `seeds` seeds, as the scripts write them: configs from the scripts' own defaults.
    `student(k, i)`: the test accuracy of student k of the table, seed i (default: KD students a few points above
    λ = 0, seeds 1.5 points apart); `gap(k)`: its training minus test accuracy; `agree(k, acc)`: its agreement with
    the teacher; `methods`: {method or "lam0": (old-task, new-task test accuracy)} (seed i adds i to both)."""
    t = vars(q1a.parse(["--epochs", str(epochs)])) | {"precision": "fp32"}
    for k in ("data", "out", "device"):
        t.pop(k)
    write_run(f"{out}/teacher", t, history(epochs, teacher), {
        "train_acc": teacher + 3.25, "test_acc": teacher, "train_loss": 0.1, "test_loss": 0.2, "epochs": epochs, "device": "cpu",
        "cifar10_source": "official", "train_images": n_train, "test_images": n_test})
    with open(f"{out}/teacher/model.pt", "wb") as f:
        f.write(b"weights")
    kd = vars(q1b.parse(["--epochs", str(epochs)]))
    shared = {k: kd[k] for k in ("epochs", "lr", "fc1_lr", "batch", "momentum", "wd", "warmup", "clip", "bn", "dropout",
                                 "augment", "seed")} | {"precision": "fp32", "teacher_sha256": "ab" * 32}
    accs = {}
    for k, (label, T, lam) in enumerate(q1b.TABLE):
        for i in range(seeds):
            acc = student(k, i)
            accs.setdefault(label, []).append(acc)
            fid = {"test_ce": 0.8, "test_agree": agree(k, acc), "test_kl": 0.3}
            write_run(f"{out}/kd/{q1b.name(T, lam, i)}", shared | {"T": T, "lam": lam, "seed": i},
                      history(epochs, acc, lambda e: {"test_ce": 1.0 / (e + 1), "test_agree": agree(k, acc) - epochs + e,
                                                      "test_kl": 0.3}),
                      {"train_acc": acc + gap(k), "test_acc": acc, "train_loss": 0.5, "test_loss": 0.6, "T": T, "lam": lam,
                       "seed": i, "epochs": epochs, "device": "cpu"} | fid)
    with open(f"{out}/kd/soft_targets.json", "w") as f:  # as q1b_kd.py records them (common.soft_target_summary)
        json.dump({"label": 3} | {f"{T:g}": {"top": 0.9 / T ** 0.5, "true": 0.8 / T ** 0.5, "entropy": 1 - 0.5 / T,
                                             "example": [0.1] * 10} for T in (1, 5, 10, 20)}, f)
    if sweep:
        with open(f"{out}/kd/sweep.json", "w") as f:
            json.dump({"T": [2.0, 8.0], "lam": [0.5, 0.9], "seeds": 1}, f)
        for T, lam, acc in ((2.0, 0.5, 66.25), (2.0, 0.9, 71.5), (8.0, 0.5, 64.0), (8.0, 0.9, 69.75)):
            write_run(f"{out}/kd/{q1b.name(T, lam)}", shared | {"T": T, "lam": lam, "seed": 0},
                      history(epochs, acc, lambda e: {"test_ce": 1.0 / (e + 1)}),
                      {"train_acc": acc + 5, "test_acc": acc, "train_loss": 0.5, "test_loss": 0.6, "T": T, "lam": lam,
                       "seed": 0, "epochs": epochs, "device": "cpu"})
    args = q2.parse(["--epochs", str(epochs), "--lwf-warmup", "1", "--faces", "/somewhere/faces"])
    args.precision, args.teacher_sha256 = "fp32", "ab" * 32
    for key, m, lam in [(m, m, 1.0) for m in q2.METHODS] + [("lwf_lam0", "lwf", 0.0)]:
        old, new = (methods or METHOD_ACC)[m if key != "lwf_lam0" else "lam0"]
        for i in range(seeds):
            o = old if m == "fe" else old + i
            write_run(q2.run_dir(args, key, i).replace(args.out, str(out)), q2.method_config(m, args, 0.1, i, lam),
                      history(epochs, new + i, lambda e: {"old_test_acc": before if e == 0 else o}),
                      {"old_train_acc": o + 2, "old_test_acc": o, "new_train_acc": new + 10, "new_test_acc": new + i,
                       "old_train_acc_before": before + 2, "old_test_acc_before": before, "seed": i, "epochs": epochs,
                       "device": "cpu", "faces_source": "DigiFace-1M"})
    return accs


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The report of the fake results, made once: (out, its PDF's text per page, what report printed)."""
    out = tmp_path_factory.mktemp("report")
    fake_out(str(out))
    report.main(["--out", str(out), "--author", "Ada Lovelace", "--student-id", "A0123456Z"])
    return out, pdf_text(out / "report.pdf")


def test_the_report_compiles_to_a4_portrait_with_a_title_block(made):
    out, pages = made
    import pypdf
    for page in pypdf.PdfReader(out / "report.pdf").pages:
        width, height = float(page.mediabox.width), float(page.mediabox.height)
        assert (round(width), round(height)) == (595, 842)  # A4 portrait, in points
    first = pages[0]
    assert "Assignment 2: Knowledge Distillation and Continual Learning" in first and "EEE7331" in first
    assert "Ada Lovelace" in first and "A0123456Z" in first


def test_every_tables_numbers_appear_in_the_pdf(made):
    out, pages = made
    text = " ".join(pages)
    numbers = set()
    for name in os.listdir(out / "tables"):
        if name.endswith(".md"):
            for line in (out / "tables" / name).read_text().splitlines()[2:]:
                numbers |= set(re.findall(r"\d+\.\d\d(?: ± \d+\.\d\d)?", line))
    assert len(numbers) > 40
    assert not [n for n in sorted(numbers) if n not in text]
    # the KD table's cells are the seeds' mean ± standard deviation: KD 1 had 64.0 and 65.5
    assert "64.75 ± 1.06" in text


def test_the_appendix_holds_every_line_of_the_code(made):
    out, pages = made
    start = appendix_page(out)
    code = re.sub(r"\s+", "", "".join(pages[start - 1:]))
    for name in report.APPENDIX:
        lines = [re.sub(r"\s+", "", line.replace("\u2212", "-")) for line in open(os.path.join(ROOT, name))]
        missing = [line for line in lines if line and line not in code]
        assert not missing, (name, missing[:3])


def test_no_make_variable_path_or_python_repr_before_the_appendix(made):
    out, pages = made
    body = "\n".join(pages[:appendix_page(out) - 1])
    assert not re.findall(r"\b[A-Z][A-Z_]{2,}=|\bout/|/somewhere|\[\[|channels_last|lock-step|PRETRAINED|stopped|new_full"
                          r"|math\.nan|checkpoint", body)  # neither pipeline words nor infrastructure in the listings
    assert "Reproducibility" in body and "ab" * 32 not in body  # the teacher's sha256 is of its weights' file
    assert report.file_sha256(str(out / "teacher" / "model.pt")) in body


def test_sections_follow_the_assignments_numbering_and_refer_to_numbered_figures_and_tables(made):
    out, pages = made
    body = "\n".join(pages[:appendix_page(out) - 1])
    heads = ["Introduction", "Question 1", "Part A", "(1) Training setup", "(2), (3) Loss and accuracy",
             "(4) Final accuracy", "Part B", "(1) Soft targets", "(2) Training setup", "(3) Loss and curves",
             "(4) Results", "(5) Bonus", "Question 2", "(1) Feature extraction", "(2) Fine-tuning",
             "(3) Learning without Forgetting", "References beyond the assignment", "(4) Results", "Reproducibility"]
    start = 0
    for head in heads:  # each there, in this order
        start = body.index(head, start)
    flat = re.sub(r"\s+", " ", body)
    for kind in ("Figure", "Table", "Listing"):
        captions = [int(n) for n in re.findall(rf"^{kind}\s+(\d+):", body, re.M)]  # (a justified line: 2 spaces)
        assert captions == list(range(1, len(captions) + 1)) and captions, kind
        cited = {int(n) for refs in re.findall(rf"{kind}s? ((?:\d+(?:, | and )?)+)(?!\d|:)", flat)
                 for n in re.findall(r"\d+", refs)}
        assert set(captions) <= cited, (kind, set(captions) - cited)  # each referred to from the text
    assert not re.findall(r"@(?:fig|tab|lst)-|#(?:if|let|tab)\b", body)  # every reference resolved, no markup printed


def rows_of(table):
    """{comparison (with its task): (difference, two standard errors, verdict)} of a comparison table."""
    out, what = {}, ""
    for r in table["rows"]:
        what = r[0] or what
        out[what + (f" / {r[1]}" if len(r) == 5 else "")] = tuple(r[-3:])
    return out


def test_each_comparison_is_a_difference_with_two_standard_errors_and_a_verdict(made):
    out, pages = made
    body = re.sub(r"\s+", " ", " ".join(pages))
    d = json.load(open(out / "report.json"))
    kd = rows_of(d["kd"]["q"]["table"])
    # KD 1 (T = 5) against λ = 0: (64.0, 65.5) against (60.0, 61.5): +4.00, standard error sqrt(2 x 1.125 / 2) = 1.06
    assert kd["KD 1, T = 5, λ = 0.1 − λ = 0"] == ("+4.00", "2.12", "higher")
    assert "KD 1, T = 5, λ = 0.1 - λ = 0 +4.00 2.12 higher" in body  # the table, in the PDF (minus signs as hyphens)
    assert report.compare([60.0, 61.5], [60.0, 62.0])["v"] == 0
    c = report.compare([70.0, 71.0, 72.0], [95.0])  # against one teacher: its spread is not counted
    assert (c["d"], round(c["e"], 4), c["v"]) == (-24.0, round(2 / 3 ** 0.5, 4), -1)
    assert report.compare([60.0], [58.0]) == {"d": 2.0, "e": None, "v": 0}  # one seed each, no yardstick given
    assert report.compare([60.0], [58.0], 1.5)["v"] == 1 and report.compare([60.0], [58.0], 2.5)["v"] == 0
    q2 = rows_of(d["q2"]["q"]["table"])
    assert q2["LwF − LwF at λo = 0 / old (CIFAR-10)"][2] == "higher"  # 75-76 against 35-36
    assert "picked on the test set itself, which flatters it" in body
    assert "T = 2 and λ = 0.9, reaches 71.50%" in body and "no cell reaches the teacher" in body
    assert "Feature extraction cannot forget" in body and "rather than a finding" in body
    assert "100-subject face-recognition task" in body and "512→100 layer" in body  # the face task as it ran


def test_an_edited_report_source_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    fake_out(str(out), seeds=1)
    report.main(["--out", str(out)])
    typ = out / "report.typ"
    edited = typ.read_text().replace("= Introduction\n", "= Introduction\n\nMy own words.\n")
    assert edited != typ.read_text()
    typ.write_text(edited)
    pdf, data = (out / "report.pdf").read_bytes(), (out / "report.json").read_text()
    (out / "kd" / "lam0" / "result.json").write_text((out / "kd" / "lam0" / "result.json").read_text().replace(
        '"test_acc": 60.0', '"test_acc": 61.0'))  # a result changed since: the edited report keeps the numbers it had
    report.main(["--out", str(out)])
    assert typ.read_text() == edited and (out / "report.pdf").read_bytes() == pdf
    assert (out / "report.json").read_text() == data
    assert f"{out}/report.typ was edited since make report wrote it: kept as it is, with the report.json it reads; " \
           f"the new report is {out}/report.new.typ" in capsys.readouterr().out
    assert (out / "report.new.typ").exists() and (out / "report.new.pdf").exists()
    assert "61.00" in (out / "report.new.json").read_text() and "61.00" in " ".join(pdf_text(out / "report.new.pdf"))
    assert report.written(str(typ.with_name("absent.typ"))) and not report.written(str(typ))  # gone: written again


def test_without_typst_the_sources_are_written_and_one_line_says_how_to_compile(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fake_out(str(out), seeds=1)
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "typst" else real(name, *a, **k))
    report.main(["--out", str(out)])
    assert (out / "report.typ").exists() and (out / "report.json").exists() and not (out / "report.pdf").exists()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("no PDF")]
    assert lines == [f"no PDF: the typst package is not installed (pip install typst); compile {out}/report.typ "
                     f"with `typst compile {out}/report.typ --input data=report.json` or at typst.app"]


def test_a_report_of_the_teacher_alone_names_what_is_not_run_yet(tmp_path, capsys):
    out = tmp_path / "out"
    fake_out(str(out), seeds=1)
    for d in ("kd", "continual"):
        import shutil
        shutil.rmtree(out / d)
    report.main(["--out", str(out)])
    text = re.sub(r"\s+", " ", " ".join(pdf_text(out / "report.pdf")))
    assert "Not run yet: the students of the table (make kd-table makes it)" in text
    assert "Not run yet: the continual-learning methods (make continual makes it)" in text
    assert "(3 part(s) not run yet)" in capsys.readouterr().out


def test_report_without_runs_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        report.main(["--out", str(tmp_path / "none")])
    assert str(e.value).startswith("error: ") and "nothing has been run yet" in str(e.value)


def test_with_one_seed_differences_are_set_against_the_test_sets_own_noise(tmp_path):
    fake_out(str(tmp_path), seeds=1)  # students at 60, 62, 64, 66, 68 % on 10,000 test images
    q = report.q1_facts(report.gather(str(tmp_path)))
    bound = 2 * 100 * (2 * 0.64 * 0.36 / 10000) ** 0.5  # two standard errors of a difference near 64%: 1.36 points
    assert q["noise"] == {"n": 1, "n_test": "10,000", "p": "64", "two_se": f"{bound:.1f}"}
    assert rows_of(q["table"])["KD 1, T = 5, λ = 0.1 − λ = 0"] == ("+4.00", f"{bound:.2f}", "higher")
    assert q["kd_effect"] == "up" and q["vs_teacher"] == -1


def facts_of(out):
    """What report.typ's conditions read (no figures drawn, no compile)."""
    g = report.gather(str(out))
    return report.q1_facts(g), report.q2_facts(g)


def test_the_report_of_a_full_gpu_like_run_says_what_its_numbers_show(tmp_path):
    """A 95% teacher, students of 80-86% over three seeds (KD 2 and KD 3 level), 100 subjects: the facts of a
    full run, where a small run's would be wrong."""
    acc = [82.0, 80.0, 84.0, 86.0, 86.0]
    methods = {"fe": (93.0, 60.0), "ft": (40.0, 80.0), "lwf": (75.0, 70.0), "joint": (91.0, 78.0), "ft-all": (30.0, 82.0),
               "lam0": (35.0, 81.0)}
    fake_out(str(tmp_path), seeds=3, teacher=95.0, student=lambda k, i: acc[k] + 0.5 * i, methods=methods)
    q1, q2 = facts_of(tmp_path)
    assert q1["vs_teacher"] == -1 and q1["kd_effect"] == "up" and q1["noise"]["n"] == 3
    assert rows_of(q1["table"])["KD 3, T = 20 − KD 2, T = 10"] == ("+0.00", "0.82", "within noise")
    assert q1["temps"][1] == {"a": "T = 10", "b": "T = 20", "v": 0, "d": "0.0"}
    assert q2["unshown"] == "" and q2["forgets"]["ft"]["v"] == -1 and q2["cmp"]["joint-lwf"]["old"] == 1
    d = report.report_data(report.gather(str(tmp_path)), "", "")
    assert d["intro"]["task"] == "100-subject" and d["q2"]["subjects"] == 100 and d["q2"]["test_per"] == 10
    assert d["intro"]["source"] == "official" and d["intro"]["pretrained"]  # nothing to warn of


def test_the_report_of_the_real_image_run_in_docs(tmp_path):
    """The pipeline's run on 5,000 real CIFAR-10 images (a JPEG copy), one seed, its teacher weak: a student
    within noise of it, no effect of the soft targets it could resolve, the face task's 10 synthetic subjects."""
    out = tmp_path / "out"
    shutil.copytree(os.path.join(ROOT, "docs", "real_cifar_run"), out)
    (out / "teacher" / "model.pt").write_bytes(b"weights not kept")
    d = report.report_data(report.gather(str(out)), "", "")
    text = json.dumps(d, ensure_ascii=False)
    assert "CIFAR-10 images, not the official files" in text and "synthetic substitute for CIFAR-10" not in text
    assert d["intro"]["source"] == "other" and not d["intro"]["pretrained"] and not d["intro"]["full"]
    assert "5,000 training and 2,000 test images" in text
    q1, q2 = d["kd"]["q"], d["q2"]["q"]
    assert q1["best"] == "KD 3, T = 20" and q1["vs_teacher"] == 0 and q1["weak_teacher"]
    assert q1["kd_effect"] == "none" and q1["gap"]["effect"] == "none"
    assert d["intro"]["task"] == "10-subject" and d["q2"]["subjects"] == 10 and "100-subject" not in text
    assert d["q2"]["synthetic_faces"] and not d["q2"]["lr_from_teacher"]  # Q2's rate was set for the run: 0.01
