import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import q1a_teacher  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test reaches the internet: every download goes to a proxy that refuses at once (the local
    test server on 127.0.0.1 stays reachable), and torchvision's weight cache starts empty."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A small synthetic CIFAR-10 in the real cifar-10-batches-py format."""
    root = str(tmp_path_factory.mktemp("cifar"))
    common.write_synthetic_cifar(root, n_train=60, n_test=30)
    return root


@pytest.fixture(scope="session")
def faces_root(tmp_path_factory):
    """A synthetic face folder: 6 subjects x 12 images of 24x24."""
    root = str(tmp_path_factory.mktemp("faces"))
    common.write_synthetic_faces(root, subjects=6, per_subject=12, size=24)
    return root


@pytest.fixture(scope="session")
def teacher_out(tmp_path_factory, cifar_root):
    """A finished teacher run (random weights, 1 epoch): copy it before changing anything in it."""
    out = str(tmp_path_factory.mktemp("teacher_out"))
    q1a_teacher.main(["--data", cifar_root, "--out", out, "--pretrained", "0", "--epochs", "1", "--batch", "20",
                      "--lr", "0.01", "--warmup", "0", "--device", "cpu"])
    return out


def one_line_error(excinfo, *fragments):
    """The SystemExit of a bad input: one line, 'error: ...', naming what is wrong."""
    msg = str(excinfo.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg
