import csv
import os

import report
from common import plot_curves, write_json, write_table


def test_report_holds_every_table_and_figure_and_lists_what_is_missing(tmp_path, capsys):
    out = tmp_path / "out"
    items = [item for _, group in report.sections() for item in group]
    present = [it for it in items if "sweep" not in it[1][0]]  # the bonus sweeps were not run
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.2 / e, "train_acc": 50 + e, "test_acc": 45 + e}
               for e in (1, 2, 3)]
    for kind, paths, _, _ in present:
        for path in paths:
            full = str(out / path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if kind in ("table", "optional"):
                write_table(full, f"Title of {os.path.basename(path)}", ["a", "b"], [["1.00", "2.00"]], note="a note")
            else:
                plot_curves([history], "acc", full, path)
                write_json(os.path.join(os.path.dirname(full), "config.json"), {"epochs": 3, "lr": 0.1})
    report.main(["--out", str(out)])
    md = (out / "report.md").read_text()
    for kind, paths, _, command in items:
        for path in paths:
            if any(path in p[1] for p in present):
                assert (f"]({path})" if kind == "figures" else f"Title of {os.path.basename(path)}") in md
            elif kind == "optional":
                assert path not in md  # make all does not make it: not "missing"
            else:
                assert f"*Missing: `{path}` (run `{command}`).*" in md and command == "make kd-sweep"
    assert md.index("teacher_setup") < md.index("kd_table") < md.index("continual_table")  # the assignment's order
    assert "epochs=3, lr=0.1" in md  # captions name the run's configuration
    assert "Teacher weights: sha256 missing (make teacher). Code: git commit " in md
    pdf = (out / "report.pdf").read_bytes()
    pages = pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ")
    assert pdf.startswith(b"%PDF") and pages == 2 + len(present)  # title, one page per item, the missing parts
    assert "2 parts missing" in capsys.readouterr().out


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_observations_are_differences_with_their_seed_spread_and_a_verdict(tmp_path):
    out = tmp_path
    header = ["model", "T", "lam", "seed", "train_acc", "test_acc", "diverged"]
    rows = [["Teacher Network (Part A)", "", "", "", 99, 95.0, ""]]
    for label, accs in (("Student Network (λ = 0)", [70, 71, 72]), ("Student Network (λ = 1)", [60, 70, 80]),
                        ("KD 1", [74, 75, 76]), ("KD 2", [71, 72, 73]), ("KD 3", [70, 71, 72])):
        rows += [[label, 1, 0.1, s, 90, a, ""] for s, a in enumerate(accs)]
    write_csv(str(out / "tables" / "kd_table.csv"), header, rows)
    obs = report.q1_observations(str(out))
    # KD 1 against λ = 0: +4.00; standard error sqrt(1/3 + 1/3) = 0.816; 4 > 2 x 0.816
    assert "KD 1 (T = 5, λ = 0.1) against λ = 0, test accuracy: better by 4.00 ± 0.82 points (n = 3 and 3)" in obs
    # λ = 1: 70 - 71 = -1.00 ± sqrt(100/3 + 1/3) = 5.80: within noise
    assert "Student Network (λ = 1), T = 20, against λ = 0, test accuracy: within noise (-1.00 ± 5.80 points, " \
           "n = 3 and 3)" in obs
    assert any(o.startswith("effect of T at λ = 0.1: T = 10 against T = 5: worse by 3.00 ± 0.82") for o in obs)
    # the gap: the best student (KD 1, 75) against the one teacher (95): worse by 20 ± 1/sqrt(3) = 0.58
    assert any(o.startswith("teacher-student gap") and "worse by 20.00 ± 0.58 points (n = 3, against one run)" in o
               for o in obs)
    one = [rows[0]] + [[r[0], 1, 0.1, 0, 90, r[5], ""] for r in rows[1::3]]
    write_csv(str(out / "tables" / "kd_table.csv"), header, one)
    assert "no spread to judge it by" in report.q1_observations(str(out))[0]
