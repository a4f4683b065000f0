import bench


def test_bench_prints_its_table_in_a_tiny_configuration(tmp_path, capsys):
    bench.main(["--out", str(tmp_path), "--device", "cpu", "--batch", "4", "--steps", "1", "--students", "2",
                "--images", "64", "--data-batch", "16"])
    printed = capsys.readouterr().out
    table = (tmp_path / "bench.md").read_text()
    for measure in ("teacher training step", "student training step", "KD step", "2 students in lock-step",
                    "data pipeline"):
        assert measure in printed and measure in table
    assert "x the time" in table and "x faster" in table
