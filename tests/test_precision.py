"""PRECISION: bf16 or fp16 autocast as each card is fast at, fp16 with a loss scale per student."""
import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import machinery
import q1a_teacher
import q2_continual as q2
from common import Batches, Students, sgd, train_epoch, warmup_cosine
from conftest import one_line_error
from machinery import Step, get_precision


def test_auto_is_bf16_from_compute_capability_8_fp16_below_and_fp32_on_the_cpu(monkeypatch):
    assert get_precision("auto", torch.device("cpu")) == "fp32"
    for capability, expected in (((7, 5), "fp16"), ((6, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert get_precision("auto", torch.device("cuda")) == expected  # T4 7.5, P100 6.0, A100 8.0, H100 9.0
    assert get_precision("fp32", torch.device("cuda")) == "fp32"  # asked for: as asked


def test_a_bad_precision_is_one_line(tmp_path, cifar_root):
    with pytest.raises(SystemExit) as e:
        q1a_teacher.main(["--data", cifar_root, "--out", str(tmp_path), "--precision", "fp8"])
    one_line_error(e, "--precision: invalid choice: 'fp8'", "'auto', 'bf16', 'fp16', 'fp32'")
    assert not (tmp_path / "teacher").exists()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def per_part(model):
    return [{"params": list(m.parameters())} for m in model]


def test_one_students_fp16_overflow_skips_its_step_alone():
    torch.manual_seed(0)
    group, alone = Students([Net(), Net()]), None
    alone = Students([copy.deepcopy(group[0])])
    before = [copy.deepcopy(m.state_dict()) for m in group]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(16) % 10

    def loss_fn(students, xb, yb):  # student 1's loss is so large that its scaled gradient overflows float16
        logits = students(xb)
        losses = torch.stack([F.cross_entropy(lg.float(), yb) for lg in logits])
        return losses * torch.tensor([1.0, 1e6])[:len(losses)], logits
    steps, opts = [], []
    for model in (group, alone):
        opt = sgd(per_part(model), 0.1)
        opts.append(opt)
        steps.append(Step(model, opt, "fp16"))
        train_epoch(model, loss_fn, warmup_cosine(opt, 10, 0), Batches(x, y, batch_size=16), steps[-1])
        assert not steps[-1].bad.any()  # an overflow of the gradient is not a divergence: the loss itself is finite
    assert all(torch.equal(v, before[1][k]) for k, v in group[1].state_dict().items() if "running" not in k)  # skipped
    assert all(not opts[0].state[q]["momentum_buffer"].any() for q in group[1].parameters())  # its momentum too
    assert all(torch.equal(v, alone[0].state_dict()[k]) for k, v in group[0].state_dict().items())  # as if alone
    assert not torch.equal(group[0].conv.weight, before[0]["conv.weight"])
    assert steps[0].scale.tolist() == [2.0 ** 16, 2.0 ** 15] and steps[1].scale.tolist() == [2.0 ** 16]


def test_an_fp16_overflow_in_the_forward_pass_skips_a_step_and_only_a_run_of_them_is_a_divergence():
    """GradScaler's rule: an inf loss (an fp16 overflow in the forward pass) skips that step and halves
    the scale; the student trains on. Only a loss that overflows step after step, until the scale falls
    below 1 (17 steps from 2^16), is a divergence."""
    torch.manual_seed(0)
    group = Students([Net(), Net()])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(40) % 10
    steps = []

    def loss_fn(students, xb, yb, inf_steps):  # student 1's loss is inf at the steps given
        logits = students(xb)
        losses = torch.stack([F.cross_entropy(lg.float(), yb) for lg in logits])
        steps.append(1)
        return losses * torch.tensor([1.0, math.inf if len(steps) in inf_steps else 1.0]), logits
    opt = sgd(per_part(group), 0.1)
    step = Step(group, opt, "fp16")
    train_epoch(group, lambda *a: loss_fn(*a, {2}), warmup_cosine(opt, 100, 0), Batches(x, y, batch_size=8), step)
    assert step.bad.tolist() == [0, 0] and step.scale.tolist() == [2.0 ** 16, 2.0 ** 15]  # 5 steps, one inf
    assert all(torch.isfinite(q).all() for q in group.parameters())
    steps.clear()
    step.epoch()
    train_epoch(group, lambda *a: loss_fn(*a, set(range(1, 100))), warmup_cosine(opt, 100, 0),
                Batches(x.repeat(5, 1, 1, 1), y.repeat(5), batch_size=8), step)
    assert step.bad.tolist() == [0, 16]  # 2^15 halved 16 times is 0.5: diverged at the 16th step of this epoch
    assert all(torch.isfinite(q).all() for q in group.parameters())


def test_the_loss_scale_grows_after_a_run_of_good_steps_and_is_off_outside_fp16():
    net = Net()
    opt = sgd(net.parameters(), 0.0)
    step = Step(net, opt, "fp16", interval=2)
    for _ in range(2):
        step(net(torch.randn(2, 3, 4, 4)).sum())
    assert step.scale.tolist() == [2.0 ** 17]
    assert Step(net, opt, "fp32").scale.tolist() == [1.0]


def test_fp16_end_to_end_on_the_cpu_agrees_with_fp32(tmp_path, teacher_out, faces_root):
    """Feature extraction through q2_continual.py, fp16 autocast with loss scaling against fp32. float16 keeps
    11 significant bits: each product is off by up to 2^-11 = 0.05% of itself, and a ResNet18 forward chains 20
    layers of them (accumulated in 32 bits). Measured here, the two runs' losses differ by about 2e-5 of
    themselves after two epochs: the test allows 1e-3 (50 times that), far below what a broken loss scale
    would do (skipped steps leave the new head untrained: tens of percent). They must differ, though, or fp16
    was not used. The old task, untouched, stays exactly the teacher's in both."""
    runs, cifar = {}, str(tmp_path / "cifar")
    machinery.write_synthetic_cifar(cifar, n_train=10, n_test=10)  # the old task, small: float16 is slow on a CPU
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        shutil.copytree(teacher_out, out)
        q2.main(["--data", cifar, "--out", str(out), "--device", "cpu", "--faces", faces_root, "--subjects", "5",
                 "--per-subject", "10", "--train-per-subject", "8", "--face-size", "8", "--epochs", "2", "--batch",
                 "10", "--methods", "fe", "--precision", precision])
        runs[precision] = [json.load(open(out / "continual" / "fe" / f)) for f in ("history.json", "result.json",
                                                                               "config.json")]
    (h32, r32, _), (h16, r16, c16) = runs["fp32"], runs["fp16"]
    assert c16["precision"] == "fp16"
    for a, b in zip(h32, h16):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (key, a[key], b[key])
    assert any(a[k] != b[k] for a, b in zip(h32, h16) for k in ("train_loss", "test_loss"))  # it ran in float16
    assert r16["old_test_acc"] == r16["old_test_acc_before"]  # feature extraction keeps the old task, in fp16 too
    assert abs(r16["new_test_acc"] - r32["new_test_acc"]) <= 10  # at most one of the 10 face test images


def test_a_run_made_in_one_precision_is_not_resumed_in_another(tmp_path, cifar_root, teacher_out):
    out = tmp_path / "out"
    shutil.copytree(teacher_out, out)
    with pytest.raises(SystemExit) as e:
        q1a_teacher.main(["--data", cifar_root, "--out", str(out), "--pretrained", "0", "--epochs", "1", "--batch",
                          "20", "--lr", "0.01", "--warmup", "0", "--device", "cpu", "--precision", "bf16"])
    one_line_error(e, "another config", "precision: fp32 -> bf16")
    assert machinery.read_json(str(out / "teacher" / "config.json"))["precision"] == "fp32"
