import copy
import csv
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import q2_continual as q2
import report
from common import (Batches, ContinualNet, cross_entropy, evaluate, fit, load_cifar10, sgd, soft_cross_entropy,
                    teacher_resnet18, warmup_cosine)
import machinery
from files import _prototypes, _samples, write_synthetic_cifar


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
    assert [e["old_test_acc"] for e in h] == [t["test_acc"]] * 3  # epoch 0 (before any change), 1 and 2
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
    net = ContinualNet(teacher_resnet18(pretrained=False), 100)
    groups = q2.optimiser(net, q2.trained("ft", net, args), 0.1, args, steps=10)[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.01, 0.001])
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups[1]["params"]) == ids(net.backbone.layer4.parameters())
    assert ids(groups[2]["params"]) == ids([net.backbone.conv1.weight, net.backbone.bn1.weight, net.backbone.bn1.bias])
    trainable = ids(p for p in net.parameters() if p.requires_grad)
    assert trainable == ids(groups[0]["params"]) | ids(groups[1]["params"]) | ids(groups[2]["params"])


@pytest.mark.parametrize("method", ["lwf", "joint", "ft"])
def test_each_stage_has_its_own_optimiser_decaying_from_its_full_rates_to_zero(method):
    args = q2.parse(["--epochs", "10", "--lwf-warmup", "4", "--lwf-lr", "10"])
    net = ContinualNet(teacher_resnet18(pretrained=False), 100)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    cos = lambda lr, i, n: lr * 0.5 * (1 + math.cos(math.pi * i / n))  # noqa: E731

    def lrs(opt, sched, n):
        out = []
        for _ in range(n):
            out.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        return out
    if method == "ft":  # one stage, one decay over the 10 epochs (5 steps each)
        got = lrs(*q2.optimiser(net, q2.trained(method, net, args), 0.1, args, 50), 50)
        assert got[0] == pytest.approx([0.1, 0.01]) and got[20] == pytest.approx([cos(0.1, 20, 50), cos(0.01, 20, 50)])
        return
    opt, sched = q2.optimiser(net, q2.trained("fe", net, args), 0.1, args, 20)  # stage 1, 20 steps: the new head alone
    assert ids(p for p in net.parameters() if p.requires_grad) == ids(net.new.parameters())
    got = lrs(opt, sched, 20)
    assert got[0] == [0.1] and got[19][0] == pytest.approx(cos(0.1, 19, 20))
    opt, sched = q2.optimiser(net, q2.trained(method, net, args), 0.1, args, 30)  # stage 2: every layer
    assert ids(p for p in net.parameters() if p.requires_grad) == ids(net.parameters())
    got = lrs(opt, sched, 30)  # new head 100%, backbone and old head 10%, from the full rates again
    assert got[0] == pytest.approx([0.1, 0.01]) and got[29][1] == pytest.approx(cos(0.01, 29, 30))


def test_lwfs_two_stages_in_one_run_each_decay_and_the_old_task_holds_through_the_warm_up(out, cifar_root, faces_root):
    run(out, cifar_root, faces_root, "--methods", "lwf", "--epochs", "4", "--lwf-warmup", "2")
    h = json.load(open(out / "continual" / "lwf" / "history.json"))
    lr = json.load(open(out / "teacher" / "config.json"))["lr"]  # 4 steps an epoch, each stage its own cosine
    assert [r["lr"] for r in h] == pytest.approx([lr, lr / 2, 0, lr / 2, 0], abs=1e-12)
    before = json.load(open(out / "continual" / "lwf" / "result.json"))["old_test_acc_before"]
    assert [r["old_test_acc"] for r in h[:3]] == [before] * 3  # the warm-up trains no weight of the old task
    cfg = json.load(open(out / "continual" / "lwf" / "config.json"))
    assert cfg["lwf_warmup"] == 2 and not (out / "continual" / "lwf" / "checkpoint.pt").exists()


def test_lwf_targets_are_the_original_networks_outputs_on_the_batch():
    torch.manual_seed(0)
    teacher = teacher_resnet18(pretrained=False).eval()
    state = copy.deepcopy(teacher.state_dict())
    net = ContinualNet(copy.deepcopy(teacher), 100)
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
    the old-task test accuracy before, and after each method trained by q2.train_method at the same rates
    (100% of 0.05, 1 warm-up epoch of 6); what the backbone and old head were after the warm-up; every call
    of LwF's frozen original (its epoch)."""
    tmp = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    write_synthetic_cifar(str(tmp / "old"), n_train=400, n_test=200)
    cifar = load_cifar10(str(tmp / "old"), torch.device("cpu"))
    old_test = Batches(*cifar["test"], batch_size=256)
    teacher, gen = Small(), torch.Generator().manual_seed(0)
    train = Batches(*cifar["train"], batch_size=32, shuffle=True, augment=True, gen=gen)
    opt = sgd(teacher.parameters(), 0.05)
    fit(teacher, cross_entropy, opt, warmup_cosine(opt, 8 * len(train), 0), train, {}, 8,
        machinery.Run(str(tmp / "teacher"), {"epochs": 8}, gen))
    before = evaluate(ContinualNet(copy.deepcopy(teacher), 10), q2.old_task, old_test)["acc"]
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(300) % 10
    x = _samples(_prototypes(10, 32, seed=7), labels, g)
    faces = {"train": (x, labels), "test": (x[:60], labels[:60])}
    after, warm, originals = {}, {}, []
    counted = copy.deepcopy(teacher).eval()  # LwF's frozen original: each call counted
    for method, lam in [("lwf", v) for v in (0.0, 0.3, 1.0, 3.0)] + [("joint", None), ("ft-all", None)]:
        # lambda_o = 0 is fine-tuning every layer, with the same warm-up and rates
        args = q2.parse(["--subjects", "10", "--lwf-lr", "100", "--ft-all-lr", "100", "--lwf-warmup", "1",
                         "--lwf-lambda", str(lam or 0), "--epochs", "6", "--batch", "32", "--face-size", "32"])
        torch.manual_seed(0)
        net = ContinualNet(copy.deepcopy(teacher), 10)
        epoch = [0]
        counted._forward_pre_hooks.clear()
        counted.register_forward_pre_hook(lambda m, a: originals.append((lam, epoch[0])))  # (λo, epochs done)
        key = method if lam is None else lam

        class Watched(machinery.Run):
            def record(self, history, last, key=key):
                epoch[0] = history[-1]["epoch"]
                if epoch[0] == 1:  # the end of the warm-up
                    warm[key] = copy.deepcopy(self.parts[0].state_dict())
                super().record(history, last)
        gen = torch.Generator().manual_seed(0)
        q2.train_method(method, net, counted, faces, cifar, lam, args, 0.05,
                        Watched(str(tmp / f"{method}{lam}"), {"epochs": 6}, gen), gen)
        after[key] = evaluate(net, q2.old_task, old_test)["acc"]
    print("old-task accuracy before", before, "after", after)
    return before, after, warm, originals, teacher


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


def test_the_warm_up_trains_the_new_head_alone_and_never_calls_the_original(pair_of_tasks):
    *_, warm, originals, teacher = pair_of_tasks
    for key in (0.0, 1.0, "joint"):  # after epoch 1, every weight and statistic of backbone and old head, bit for bit
        assert all(torch.equal(v, warm[key]["old." + k[3:]] if k.startswith("fc.") else warm[key]["backbone." + k])
                   for k, v in teacher.state_dict().items()), key
    # LwF's frozen original: 300 faces in batches of 32, 9 steps an epoch, in epochs 2-6 only (the evaluations measure
    # each head's own cross-entropy: no call); for each of the four λo
    assert len(originals) == 4 * 5 * 9 and all(done >= 1 for _, done in originals)  # none before epoch 1 ended


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
