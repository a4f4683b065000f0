import os

import report
from common import plot_curves, write_json, write_table


def test_report_holds_every_table_and_figure_and_lists_what_is_missing(tmp_path, capsys):
    out = tmp_path / "out"
    items = [item for _, group in report.sections() for item in group]
    present = [it for it in items if "sweep" not in it[1]]  # the bonus sweep was not run
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.2 / e, "train_acc": 50 + e, "test_acc": 45 + e}
               for e in (1, 2, 3)]
    for kind, path, _, _ in present:
        full = str(out / path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if kind == "table":
            write_table(full, f"Title of {os.path.basename(path)}", ["a", "b"], [["1.00", "2.00"]], note="a note")
        else:
            plot_curves(history, "acc", full, path)
            write_json(os.path.join(os.path.dirname(full), "config.json"), {"epochs": 3, "lr": 0.1})
    report.main(["--out", str(out)])
    md = (out / "report.md").read_text()
    for kind, path, _, command in items:
        if any(p[1] == path for p in present):
            assert (f"Title of {os.path.basename(path)}" if kind == "table" else f"]({path})") in md
        else:
            assert f"*Missing: `{path}` (run `{command}`).*" in md and command == "make kd-sweep"
    assert md.index("teacher_setup") < md.index("kd_table") < md.index("continual_table")  # the assignment's order
    assert "epochs=3, lr=0.1" in md  # captions name the run's configuration
    pdf = (out / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") >= len(present)
    assert "2 parts missing" in capsys.readouterr().out
