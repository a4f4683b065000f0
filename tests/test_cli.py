"""Every bad input ends in one line starting 'error:', a non-zero exit, no traceback, and earlier results intact."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import q1a_teacher
import q1b_kd
import q2_continual
from common import StudentCNN
from conftest import ROOT, one_line_error


def fails(main, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return one_line_error(e, *fragments)


@pytest.mark.parametrize("argv, msg", [
    (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
    (["--lr", "-1"], "--lr: must be a number > 0, got -1"),
    (["--lr", "abc"], "'abc' is not a number"),
    (["--batch", "0"], "--batch: must be an integer >= 1"),
    (["--device", "tpu"], "unknown DEVICE 'tpu'"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "DEVICE=cuda"),
    (["--pretrained", "2"], "--pretrained: must be 0 or 1"),
])
def test_teacher_bad_arguments(tmp_path, cifar_root, argv, msg):
    fails(q1a_teacher.main, ["--data", cifar_root, "--out", str(tmp_path), "--pretrained", "0"] + argv, msg)
    assert not (tmp_path / "teacher").exists()


def test_teacher_without_data_offline(tmp_path):
    fails(q1a_teacher.main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path), "--pretrained", "0",
                             "--device", "cpu"], "CIFAR-10 is not in", "could not be downloaded")


def test_teacher_without_imagenet_weights_offline(tmp_path, cifar_root):
    fails(q1a_teacher.main, ["--data", cifar_root, "--out", str(tmp_path), "--device", "cpu"], "PRETRAINED=0")


def test_a_bad_input_prints_one_line_and_no_traceback():
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), arg], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # the three at once
             for script, arg in (("q1a_teacher.py", "--epochs=0"), ("q1b_kd.py", "--T=-1"),
                                 ("q2_continual.py", "--ft-layers=conv9"))]
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode != 0 and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


@pytest.fixture
def out(tmp_path, teacher_out):
    """A copy of a finished teacher run."""
    shutil.copytree(teacher_out, tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.parametrize("argv, msg", [
    (["--T", "0"], "--T: must be a number > 0, got 0"), (["--T", "-1"], "--T: must be a number > 0"),
    (["--lam", "1.5"], "--lam: must be in [0, 1], got 1.5"), (["--lam", "-0.1"], "--lam: must be in [0, 1]"),
    (["--dropout", "1"], "--dropout must be < 1"), (["--table", "--sweep"], "not allowed with argument"),
])
def test_kd_bad_arguments(out, cifar_root, argv, msg):
    fails(q1b_kd.main, ["--data", cifar_root, "--out", str(out), "--device", "cpu"] + argv, msg)
    assert not (out / "kd").exists()


def teacher_files(out):
    return {f: (out / "teacher" / f).read_bytes() for f in os.listdir(out / "teacher")}


def test_kd_without_teacher(tmp_path, cifar_root):
    fails(q1b_kd.main, ["--data", cifar_root, "--out", str(tmp_path), "--device", "cpu"],
          "missing teacher checkpoint", "make teacher")


def test_kd_with_a_corrupt_teacher(tmp_path, out, cifar_root):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    before = teacher_files(out)
    fails(q1b_kd.main, ["--data", cifar_root, "--out", str(out), "--device", "cpu", "--teacher", str(bad)],
          "cannot read checkpoint")
    assert teacher_files(out) == before


def test_kd_with_a_teacher_of_another_architecture(tmp_path, out, cifar_root):
    other = tmp_path / "student.pt"
    torch.save(StudentCNN().state_dict(), other)
    fails(q1b_kd.main, ["--data", cifar_root, "--out", str(out), "--device", "cpu", "--teacher", str(other)],
          "is not a checkpoint of this ResNet18 teacher")


@pytest.mark.parametrize("layers, msg", [
    ("conv6_x:10", "unknown layer 'conv6_x'"), ("conv5_x", "needs a learning rate"), ("conv5_x:0", "must be > 0"),
    ("conv5_x:10 conv5_1:1", "overlap"), ("", "FT_LAYERS is empty"),
])
def test_fine_tuning_bad_layers(out, layers, msg):
    m = fails(q2_continual.main, ["--out", str(out), "--methods", "ft", "--ft-layers", layers], msg)
    if "unknown" in msg:
        assert "conv1, conv2_x, conv2_1, conv2_2" in m and "conv5_2" in m  # lists the valid names


def test_continual_bad_face_data(tmp_path, out, cifar_root, faces_root):
    common = ["--data", cifar_root, "--out", str(out), "--device", "cpu", "--methods", "fe"]
    fails(q2_continual.main, common + ["--faces", str(tmp_path / "nope")], "does not exist")
    fails(q2_continual.main, common + ["--faces", faces_root], "only 0 subjects have at least 50")
    fails(q2_continual.main, common + ["--per-subject", "10", "--train-per-subject", "10"], "must be below")
    assert not (out / "continual").exists()
