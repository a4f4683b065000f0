import copy
import csv
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import q2_continual as q2
import report
from common import (Batches, ContinualNet, _prototypes, _samples, cross_entropy, evaluate, fit, load_cifar10, sgd,
                    soft_cross_entropy, teacher_resnet18, warmup_cosine, write_synthetic_cifar)


def run(out, cifar_root, faces_root, *extra):
    q2.main(["--data", cifar_root, "--out", str(out), "--device", "cpu", "--faces", faces_root, "--subjects", "5",
             "--per-subject", "10", "--train-per-subject", "8", "--face-size", "16", "--epochs", "2", "--batch", "10",
             "--lwf-warmup", "1", *extra])


@pytest.fixture
def out(tmp_path, teacher_out):
    shutil.copytree(teacher_out, tmp_path / "out")
    return tmp_path / "out"


def test_feature_extraction_changes_no_backbone_tensor_and_keeps_the_old_task_exactly(out, cifar_root, faces_root):
    run(out, cifar_root, faces_root, "--methods", "fe")
    teacher = torch.load(out / "teacher" / "model.pt", weights_only=True)
    net = torch.load(out / "continual" / "fe" / "model.pt", weights_only=True)
    for k, v in teacher.items():  # every weight and every BatchNorm buffer, bit for bit
        assert torch.equal(v, net["old." + k[3:]] if k.startswith("fc.") else net["backbone." + k]), k
    r = json.load(open(out / "continual" / "fe" / "result.json"))
    t = json.load(open(out / "teacher" / "result.json"))
    assert r["old_test_acc"] == r["old_test_acc_before"] == t["test_acc"]
    assert r["old_train_acc"] == r["old_train_acc_before"] == t["train_acc"]
    h = json.load(open(out / "continual" / "fe" / "history.json"))
    assert [e["old_test_acc"] for e in h] == [t["test_acc"]] * 2
    split = json.load(open(out / "continual" / "fe" / "split.json"))
    assert len(split["train"]) == 40 and len(split["test"]) == 10


def test_with_compile_the_old_task_before_is_measured_as_the_methods_are(out, cifar_root, faces_root, monkeypatch):
    """COMPILE=1: torch.compile's kernels may round differently from eager ones, so the reference the
    methods are compared with goes through the same compiled path. Compiling is stood in for by a hook
    that moves the old head's logits (as a compiler's rounding might, but enough to show)."""
    def compile(module, *a, **k):
        module.register_forward_hook(lambda m, i, o: (o[0] + torch.linspace(0, 3, o[0].shape[-1]), o[1]))
    monkeypatch.setattr(nn.Module, "compile", compile)
    run(out, cifar_root, faces_root, "--methods", "fe", "--compile", "1")
    r = json.load(open(out / "continual" / "fe" / "result.json"))
    assert r["old_test_acc"] == r["old_test_acc_before"]


def test_fine_tuning_changes_only_the_chosen_layers(out, cifar_root, faces_root):
    run(out, cifar_root, faces_root, "--methods", "ft", "--ft-layers", "conv5_2:10")
    teacher = torch.load(out / "teacher" / "model.pt", weights_only=True)
    net = torch.load(out / "continual" / "ft" / "model.pt", weights_only=True)
    params = dict(teacher_resnet18(pretrained=False).named_parameters())
    for k, v in teacher.items():
        after = net["old." + k[3:]] if k.startswith("fc.") else net["backbone." + k]
        if k.startswith("layer4.1.") and k in params:
            assert not torch.equal(v, after), k  # trained
        else:
            assert torch.equal(v, after), k  # frozen; BatchNorm statistics frozen too
    report.main(["--out", str(out)])
    table = (out / "tables" / "finetune_layers.md").read_text()
    assert "| conv5_2 | 10% (0.001) | fine-tuned; BatchNorm statistics frozen |" in table  # the teacher: lr 0.01


def test_fine_tuning_learning_rates_are_what_was_asked():
    args = q2.parse(["--ft-layers", "conv5_x:10 conv1:1"])
    net, groups, _ = q2.build("ft", teacher_resnet18(pretrained=False), args, 0.1)
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.01, 0.001])
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups[1]["params"]) == ids(net.backbone.layer4.parameters())
    assert ids(groups[2]["params"]) == ids([net.backbone.conv1.weight, net.backbone.bn1.weight, net.backbone.bn1.bias])
    trainable = ids(p for p in net.parameters() if p.requires_grad)
    assert trainable == ids(groups[0]["params"]) | ids(groups[1]["params"]) | ids(groups[2]["params"])


@pytest.mark.parametrize("method", ["lwf", "joint", "ft"])
def test_lwfs_joint_stage_starts_at_its_full_rates_and_each_stage_decays_to_zero(method):
    args = q2.parse(["--epochs", "10", "--lwf-warmup", "4", "--lwf-lr", "10"])
    net, groups, _ = q2.build(method, teacher_resnet18(pretrained=False), args, 0.1)
    opt = sgd(groups, 0.1)
    sched, lrs = q2.schedule(method, opt, args, steps=5), []
    for _ in range(50):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([0.1, 0.01])  # new head 100%, backbone and old head 10%
    if method == "ft":  # one decay over the 10 epochs
        assert lrs[20] == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * 20 / 50)), 0.01 * 0.5 * (1 + math.cos(math.pi * 20 / 50))])
    else:  # the warm-up's 20 steps decay from the full rate, and the joint stage starts from it again
        assert lrs[19][0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
        assert lrs[20] == pytest.approx([0.1, 0.01])
        assert lrs[49][1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 29 / 30)))


def test_lwf_targets_are_the_original_networks_outputs_on_the_batch():
    torch.manual_seed(0)
    teacher = teacher_resnet18(pretrained=False).eval()
    state = copy.deepcopy(teacher.state_dict())
    net, _, _ = q2.build("lwf", teacher, q2.parse([]), 0.1)
    with torch.no_grad():
        net.backbone.layer4[1].conv2.weight.mul_(1.5)  # the network has moved away from the original
    net.eval()
    original = teacher_resnet18(pretrained=False)
    original.load_state_dict(state)
    original.eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 100, (6,))
    with torch.no_grad():
        loss, _ = q2.lwf_loss(copy.deepcopy(teacher).eval(), 2.0, 1.0)(net, x, y)
        old, new = net(x)
        expected = F.cross_entropy(new, y) + soft_cross_entropy(old, original(x), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert soft_cross_entropy(old, original(x), 2.0) > soft_cross_entropy(original(x), original(x), 2.0)


class Small(nn.Module):
    """A teacher-shaped network (features + .fc) small enough to train here in seconds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def pair_of_tasks(tmp_path_factory):
    """The old task (synthetic CIFAR-10, a Small teacher trained on it) and a new task (10 other patterns):
    the old-task test accuracy before, and after each method at the same rates (100% of 0.05, 1 warm-up epoch)."""
    tmp = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    write_synthetic_cifar(str(tmp / "old"), n_train=400, n_test=200)
    cifar = load_cifar10(str(tmp / "old"), torch.device("cpu"))
    old_test = Batches(*cifar["test"], batch_size=256)
    teacher, gen = Small(), torch.Generator().manual_seed(0)
    train = Batches(*cifar["train"], batch_size=32, shuffle=True, augment=True, gen=gen)
    opt = sgd(teacher.parameters(), 0.05)
    fit(teacher, cross_entropy, opt, warmup_cosine(opt, 8 * len(train), 0), train, {}, 8, str(tmp / "teacher"), {}, gen)
    before = evaluate(ContinualNet(copy.deepcopy(teacher), 10), q2.old_task, old_test)[1]
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(300) % 10
    faces = (_samples(_prototypes(10, 32, seed=7), labels, g), labels)
    after, nets, originals = {}, {}, []
    runs = [("lwf", v) for v in (0.0, 0.3, 1.0, 3.0)] + [("joint", None), ("ft-all", None)]
    # and LwF and joint training again, computing the warm-up's old-task terms that reach no trained weight
    runs += [("lwf", 1.0, "full"), ("joint", None, "full")]
    for method, lam, *full in runs:  # lambda_o = 0 is fine-tuning every layer, with the same warm-up and rates
        args = q2.parse(["--subjects", "10", "--lwf-lr", "100", "--ft-all-lr", "100", "--lwf-warmup", "1",
                         "--lwf-lambda", str(lam or 0), "--epochs", "6"])
        net, groups, on_epoch = q2.build(method, teacher, args, 0.05)
        gen = torch.Generator().manual_seed(0)
        train = Batches(*faces, batch_size=32, shuffle=True, augment=True, gen=gen)
        original = copy.deepcopy(teacher).eval()
        original.register_forward_pre_hook(lambda m, a: originals.append(bool(full)))
        loss = q2.lwf_loss(original, 2.0, lam) if method == "lwf" else q2.new_task
        if method == "joint":
            train, loss = q2.JointBatches(train, Batches(*cifar["train"], batch_size=32, shuffle=True, gen=gen)), q2.joint_loss
        opt = sgd(groups, 0.05)
        with pytest.MonkeyPatch.context() as m:
            if full:
                m.setattr(common, "trains_old_task", lambda net: True)
            fit(net, loss, opt, q2.schedule(method, opt, args, len(train)), train, {}, 6, str(tmp / f"{method}{lam}{full}"),
                {}, gen, on_epoch=on_epoch)
        key = (method if lam is None else lam, *full)
        after[key[0] if not full else key], nets[key] = evaluate(net, q2.old_task, old_test)[1], net.state_dict()
    print("old-task accuracy before", before, "after", after)
    return before, after, nets, originals


def test_lwf_keeps_more_of_the_old_task_than_fine_tuning_all_layers_at_the_same_rate(pair_of_tasks):
    before, after, *_ = pair_of_tasks
    assert before > 60
    assert after[1.0] > after[0.0] + 5, (before, after)


def test_joint_training_keeps_the_old_task_at_least_as_well_as_lwf(pair_of_tasks):
    before, after, *_ = pair_of_tasks
    assert after["joint"] >= after[1.0], after


def test_fine_tuning_every_layer_forgets_the_most(pair_of_tasks):
    before, after, *_ = pair_of_tasks
    assert after["ft-all"] < min(v for k, v in after.items() if k != "ft-all" and not isinstance(k, tuple)), after
    assert after["ft-all"] < before - 10


def test_the_lwf_sweep_moves_toward_the_old_task_as_lambda_o_grows(pair_of_tasks):
    _, after, *_ = pair_of_tasks
    sweep = [after[v] for v in (0.0, 0.3, 1.0, 3.0)]
    # each step toward the old task, up to one standard error of 200 test images (about 2.3 points)
    assert all(b >= a - 2.3 for a, b in zip(sweep, sweep[1:])) and sweep[-1] > sweep[0] + 10, sweep


def test_the_warm_up_skips_the_original_and_the_cifar_batch_and_changes_nothing(pair_of_tasks):
    *_, nets, originals = pair_of_tasks
    for key in ((1.0, "full"), ("joint", "full")):  # every weight and statistic, bit for bit
        assert all(torch.equal(v, nets[key[:1]][k]) for k, v in nets[key].items()), key
    # LwF's frozen original: 300 faces in batches of 32, 9 steps per epoch, 6 epochs; the warm-up (epoch 1) skips it
    assert originals.count(True) == 6 * 9 and originals.count(False) == 4 * 5 * 9  # the four λo, warm-up skipped


def test_a_continual_run_of_another_teacher_is_refused(out, cifar_root, faces_root):
    run(out, cifar_root, faces_root, "--methods", "fe")
    state = torch.load(out / "teacher" / "model.pt", weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, out / "teacher" / "model.pt")
    with pytest.raises(SystemExit) as e:
        run(out, cifar_root, faces_root, "--methods", "fe")
    assert "continual/fe was made with another teacher" in str(e.value)


def test_the_five_methods_with_seeds_write_the_table_the_csv_and_the_trade_off(out, tmp_path, faces_root):
    cifar = str(tmp_path / "cifar")
    write_synthetic_cifar(cifar, n_train=10, n_test=10)  # a small old task: 12 runs evaluate it every epoch
    run(out, cifar, faces_root, "--seeds", "2", "--methods", "fe", "lwf", "joint", "--lwf-sweep", "1")
    report.main(["--out", str(out)])
    table = (out / "tables" / "continual_table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "±" in line]
    assert len(rows) == 6 and all(line.count(" ± ") == 2 for line in rows)  # 3 methods x old/new, mean ± std
    assert "| Fine Tuning | Old Task* | not run yet (make ft) |" in table
    assert "mean ± standard deviation over 2 seeds" in table.splitlines()[0]
    assert table.index("| LwF |") < table.index("**References beyond the assignment**") < table.index("| Joint training")
    per_seed = list(csv.DictReader(open(out / "tables" / "continual_table.csv")))
    assert len(per_seed) == 3 * 2 and list(per_seed[0])[:3] == ["method", "seed", "old_train_acc"]
    new = [float(r["new_test_acc"]) for r in per_seed if r["method"] == "LwF"]  # the table's cell, from the CSV
    assert f"| {sum(new) / 2:.2f} ± {abs(new[0] - new[1]) / 2 ** 0.5:.2f} |" in table
    assert (out / "tables" / "continual_table.tex").read_text().count(r"\\") >= 11  # header, 10 rows
    fe = [json.load(open(out / "continual" / f / "result.json")) for f in ("fe", "fe_seed1")]
    assert [r["seed"] for r in fe] == [0, 1] and fe[0]["old_test_acc"] == fe[1]["old_test_acc"] == fe[0]["old_test_acc_before"]
    assert (out / "figures" / "q2_forgetting.svg").exists() and (out / "continual" / "lwf_lam0_seed1" / "result.json").exists()
    sweep = (out / "tables" / "lwf_sweep.md").read_text()
    assert "| 0 |" in sweep and "| 1 |" in sweep  # λo = 1 is the LwF run itself, trained once
    assert not (out / "continual" / "lwf_lam1").exists()
