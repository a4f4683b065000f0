"""One optimiser step, checked by arithmetic: per-student clipping, weight decay, the warm-up's rates, the
old-task training curve's images, and no host sync in a training step at any precision."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import common
import machinery
import q1a_teacher
import q2_continual as q2
from common import Batches, sgd, train_epoch, warmup_cosine


def two_students(w0, w1):
    """Two one-weight-vector 'students' (a lock-step group of 2), each with its own parameter group."""
    model = nn.ModuleList([nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False)])
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([w0]))
        model[1].weight.copy_(torch.tensor([w1]))
    return model


def step_once(model, losses, lr=1.0, momentum=0.0, wd=0.0, clip=0.0, precision="fp32"):
    opt = sgd([{"params": list(m.parameters())} for m in model], lr, momentum, wd)
    before = [m.weight.detach().clone() for m in model]
    machinery.Step(model, opt, precision, clip)(losses(model))
    return [m.weight.detach() - b for m, b in zip(model, before)]


X = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # |x| = 5: a loss c * (w . x) has the gradient c * x, of norm 5c


def test_clipping_binds_each_student_on_its_own_norm_and_never_its_partners():
    # student 0's gradient 100 * x (norm 500) is cut to norm 2; student 1's 0.1 * x (norm 0.5) is under the clip
    model = two_students([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    d0, d1 = step_once(model, lambda m: torch.stack([100 * m[0](X).sum(), 0.1 * m[1](X).sum()]), clip=2.0)
    assert torch.allclose(d0, -2.0 * X / 5, atol=1e-5)  # lr 1: a step of exactly the clip's length, along -x
    assert torch.allclose(d1, -0.1 * X, atol=1e-7)  # untouched by its partner's clip (clipped as one: 0.4% of it)
    # without a clip both take their whole gradient
    model = two_students([1.0] * 4, [1.0] * 4)
    d0, _ = step_once(model, lambda m: torch.stack([100 * m[0](X).sum(), 0.1 * m[1](X).sum()]))
    assert torch.allclose(d0, -100 * X, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_clipped_step_is_the_same_under_fp16_loss_scaling(precision):
    model = two_students([1.0] * 4, [1.0] * 4)
    d0, d1 = step_once(model, lambda m: torch.stack([100 * m[0](X).sum(), 0.1 * m[1](X).sum()]), clip=2.0,
                       precision=precision)
    assert torch.allclose(d0, -2.0 * X / 5, atol=1e-4) and torch.allclose(d1, -0.1 * X, atol=1e-5)


def test_weight_decay_is_applied_at_the_rate_asked_with_nesterov_momentum():
    # a zero loss gradient: the step is weight decay alone; SGD's first step with Nesterov momentum m:
    # d = wd * w, buffer = d, update = d + m * buffer, so w <- w - lr * (1 + m) * wd * w
    model = two_students([1.0, -2.0, 0.5, 0.0], [4.0, 4.0, 4.0, 4.0])
    w = [m.weight.detach().clone() for m in model]
    d0, d1 = step_once(model, lambda m: torch.stack([0 * m[0](X).sum(), 0 * m[1](X).sum()]), lr=0.5, momentum=0.9,
                       wd=0.1)
    assert torch.allclose(d0, -0.5 * 1.9 * 0.1 * w[0]) and torch.allclose(d1, -0.5 * 1.9 * 0.1 * w[1])


def test_the_scripts_optimisers_carry_the_weight_decay_asked_for():
    args = q2.parse(["--faces", "/nowhere", "--wd", "0.003", "--momentum", "0.8"])
    net = common.ContinualNet(common.teacher_resnet18(pretrained=False), 10)
    opt, _ = q2.optimiser(net, q2.trained("ft", net, args), 0.1, args, 10)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.003} and {g["momentum"] for g in opt.param_groups} == {0.8}


def test_the_warm_up_rises_linearly_step_by_step_then_the_cosine_falls_to_zero():
    opt = sgd([nn.Parameter(torch.zeros(1))], 0.1)
    sched = warmup_cosine(opt, total_steps=8, warmup_steps=4)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(8):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # step s < 4: 0.1 (s + 1) / 4; then 0.05 (1 + cos(pi (s - 4) / 4)), at 0 from step 8 on
    want = [0.1 * (s + 1) / 4 for s in range(4)] + [0.05 * (1 + math.cos(math.pi * (s - 4) / 4)) for s in range(4, 9)]
    assert lrs == pytest.approx(want, abs=1e-12)


def test_the_teachers_run_warms_up_for_the_epochs_asked(tmp_path, tiny_cifar, monkeypatch):
    seen = []
    real = q1a_teacher.warmup_cosine
    monkeypatch.setattr(q1a_teacher, "warmup_cosine", lambda opt, total, warm: seen.append((total, warm)) or
                        real(opt, total, warm))
    q1a_teacher.main(["--data", tiny_cifar, "--out", str(tmp_path), "--pretrained", "0", "--epochs", "2", "--batch",
                      "10", "--lr", "0.01", "--warmup", "1", "--device", "cpu"])
    assert seen == [(4, 2)]  # 20 images at batch 10: 2 steps an epoch, 4 in all, the first 2 warming up
    h = machinery.read_json(str(tmp_path / "teacher" / "history.json"))
    assert h[1]["lr"] == pytest.approx(0.01) and h[2]["lr"] == pytest.approx(0.0)  # the peak after the warm-up


def test_every_method_is_measured_with_each_heads_own_loss_and_the_old_task_on_cifars_training_images(monkeypatch):
    seen = {}
    monkeypatch.setattr(q2, "fit", lambda net, loss, opt, sched, train, evals, epochs, run: seen.update(evals) or [])
    args = q2.parse(["--faces", "/nowhere", "--epochs", "2", "--lwf-warmup", "1"])
    g = torch.Generator().manual_seed(0)
    img = lambda n: torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8, generator=g)  # noqa: E731
    cifar = {"train": (img(30), torch.arange(30) % 10), "test": (img(20), torch.arange(20) % 10)}
    faces = {"train": (img(8), torch.arange(8) % 4), "test": (img(4), torch.arange(4))}
    net = common.ContinualNet(common.teacher_resnet18(pretrained=False), 4)
    for method in ("ft", "lwf"):
        seen.clear()
        q2.train_method(method, net, None, faces, cifar, 1.0, args, 0.1, None, g)
        assert seen["old_train"][1].x is cifar["train"][0] and seen["old_test"][1].x is cifar["test"][0]
        assert seen["train"][1].x is faces["train"][0] and seen["test"][1].x is faces["test"][0]
        assert seen["old_train"][0] is q2.old_task and seen["old_test"][0] is q2.old_task
        assert seen["train"][0] is q2.new_task and seen["test"][0] is q2.new_task  # not LwF's objective


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch, precision):
    """What would wait for a GPU, counted on the CPU: every Python-level read of a tensor's value during an epoch
    of a lock-step group of 3 students with clipping (fp16: loss scaling and a skipped step)."""
    torch.manual_seed(0)
    model = common.Students([nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)) for _ in range(3)])
    opt = sgd([{"params": list(m.parameters())} for m in model], 0.1)
    sched = warmup_cosine(opt, 8, 2)
    step = machinery.Step(model, opt, precision, clip=1.0, scale=2.0 ** 18)  # fp16: the first steps overflow
    x, y = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16) % 10
    data = Batches(x, y, batch_size=2, shuffle=True, augment=True, pad=1, gen=torch.Generator().manual_seed(0))
    loss = lambda m, x, y: (torch.stack([nn.functional.cross_entropy(o.float(), y) for o in m(x)]),)  # noqa: E731
    count = {}
    for name in SYNCS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _f=real, **k:
                            count.__setitem__(_n, count.get(_n, 0) + 1) or _f(self, *a, **k))
    before = [q.detach().clone() for q in model.parameters()]
    train_epoch(model, loss, sched, data, step)
    monkeypatch.undo()
    assert count == {}, count
    assert any(not torch.equal(a, q) for a, q in zip(before, model.parameters()))  # it did train
    if precision == "fp16":
        assert step.scale.max().item() < 2.0 ** 18  # overflowed, halved, on the device


def test_a_lock_step_group_takes_for_each_student_the_plain_kd_step():
    """Two students at their own T and lam, in one group (distill_loss, train_epoch, Step) and alone (kd_step):
    the same weights after three steps, the clip binding on both."""
    import q1b_kd
    torch.manual_seed(0)
    small = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),  # noqa: E731
                                  nn.Linear(4 * 6 * 6, 10))
    teacher = small().eval().requires_grad_(False)
    students = [small() for _ in range(2)]
    alone = [copy.deepcopy(m) for m in students]
    specs = [(4.0, 0.5), (20.0, 0.9)]
    group = common.Students(students)
    opt = sgd([{"params": list(m.parameters())} for m in group], 0.1)
    step = machinery.Step(group, opt, "fp32", clip=0.05)
    x, y = torch.randn(24, 3, 8, 8), torch.arange(24) % 10
    loss = q1b_kd.distill_loss(teacher, specs)
    group.train()
    for i in range(3):
        b = slice(8 * i, 8 * i + 8)
        step(loss(group, x[b], y[b])[0])
    for m, (T, lam) in zip(alone, specs):
        o = sgd(m.parameters(), 0.1)
        m.train()
        for i in range(3):
            b = slice(8 * i, 8 * i + 8)
            common.kd_step(m, teacher, o, x[b], y[b], T, lam, clip=0.05)  # it binds: without it the two differ
    for a, b in zip(alone, group):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
