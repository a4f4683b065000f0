import pytest

import bench
from conftest import one_line_error


def test_bench_prints_its_table_in_a_tiny_configuration(tmp_path, capsys):
    bench.main(["--out", str(tmp_path), "--device", "cpu", "--batch", "4", "--steps", "1", "--students", "2",
                "--images", "64", "--data-batch", "16"])
    printed = capsys.readouterr().out
    table = (tmp_path / "bench.md").read_text()
    for measure in ("teacher training step", "student training step", "KD step", "2 students in lock-step",
                    "data pipeline"):
        assert measure in printed and measure in table
    assert "x the time" in table and "x faster" in table


def test_make_plan_arithmetic(tmp_path, monkeypatch, capsys):
    rates = {k: 1e-4 for k in ("teacher_train", "teacher_eval", "student_train", "student_eval", "face_train", "face_eval")}
    monkeypatch.setattr(bench, "probe", lambda *a: (rates, {}))  # the timing is not tested, the arithmetic is
    steps = bench.main(["--plan", "--out", str(tmp_path), "--device", "cpu", "--teacher-args", "--epochs 30 --batch 512",
                        "--kd-args", "--epochs 30 --batch 512 --seeds 3 --group 10",
                        "--cl-args", f"--epochs 20 --batch 128 --seeds 3 --data {tmp_path}"])
    s = {name: (runs, sgd, group, sec, disk) for name, runs, sgd, group, sec, disk in steps}
    assert s["teacher"][1] == 30 * (50000 // 512) == 2910
    assert s["teacher"][3] == pytest.approx(30 * (50000 + 60000) * 1e-4)  # training + evaluation passes
    # one group per seed (5 students each, under GROUP=10)
    assert s["kd-table"][0] == "5 students x 3 seed(s)" and s["kd-table"][2] == "5+5+5" and s["kd-table"][4] == 15 * 94e6
    assert s["kd-table"][1] == 3 * 30 * 97  # each group steps through the epochs
    assert 46_756_294 * 2 < 94e6 < 46_756_294 * 2 * 1.01  # a student's float16 weights (StudentCNN's docstring)
    # per epoch: the teacher on each group's (seed's) batches; the 15 students' steps, their evaluations (train,
    # test, test CE)
    assert s["kd-table"][3] == pytest.approx(60000e-4 + 30 * (3 * 50000 + 15 * 50000 + 15 * 70000) * 1e-4)
    assert s["kd-sweep"][0] == "30 students in 3 group(s)" and s["kd-sweep"][1] == 3 * 30 * 97
    assert s["continual"][0] == "5 methods x 3 seed(s)" and s["continual"][1] == 5 * 3 * 20 * (4000 // 128)
    out = capsys.readouterr().out
    assert "| all |" in out and "Downloads: CIFAR-10 (163 MB): needed" in out
    # the disk at its peak: the table's 15 students, then the sweep's largest group (10) checkpoint twice
    # (the old one and the one being written)
    weights = 45e6 + 15 * 94e6 + 15 * 45e6
    assert f"{(weights + 30 * 94e6) / 1e9:.1f} GB at the end, {(weights + 2 * 10 * 374e6) / 1e9:.1f} GB at the peak" in out
    assert (tmp_path / "plan.md").exists()


def test_the_recipe_comparison_reads_the_cifar_in_data_and_records_each_epoch(tmp_path, cifar_root, capsys):
    bench.main(["--compare", "sgd", "adamw", "--data", cifar_root, "--out", str(tmp_path), "--device", "cpu",
                "--epochs", "2", "--batch", "20"])
    table = (tmp_path / "compare.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| SGD") or r.startswith("| AdamW")]
    assert len(rows) == 2 and all(len(r.split("|")) == 7 for r in rows)  # recipe, 2 epochs, loss, minutes
    assert "synthetic CIFAR-10 of" in table and "60 training, 30 test images" in table and "3 steps per epoch" in table
    with pytest.raises(SystemExit) as e:
        bench.main(["--compare", "sgd", "lion", "--data", cifar_root, "--out", str(tmp_path), "--device", "cpu"])
    one_line_error(e, "unknown recipe 'lion'", "sgd, sgd-noclip")


def test_the_lr_range_test_reads_the_cifar_in_data(tmp_path, cifar_root):
    bench.main(["--lr-range", "--data", cifar_root, "--out", str(tmp_path), "--device", "cpu", "--batch", "6",
                "--range-steps", "8", "--clips", "0", "--teacher-steps", "1"])
    md = (tmp_path / "lr_range.md").read_text()
    assert "synthetic CIFAR-10 of" in md and "8 steps of batch 6" in md and md.count("no clip") == 2
