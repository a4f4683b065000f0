"""The assignment's shared pieces, used by q1a_teacher.py, q1b_kd.py and q2_continual.py, in the order data
flows: the data (CIFAR-10, faces), the models (the modified ResNet18 teacher, the student, the two-headed
network of Q2), the losses (KD, LwF) and the one training loop. Plain functions and tensors. What makes runs
safe, resumable and fast (downloads, checkpoints, locks, precision) is in machinery.py; the figures, in plots.py.
"""
import math
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import machinery as M
from machinery import die

EVAL_IMAGES = 10000  # a training set is measured on a fixed 10,000 of its images after each epoch, on all after the last


# =============================================================================
# Data: CIFAR-10
# =============================================================================

# ImageNet statistics for every input: the teacher starts from ImageNet weights, and the face
# task reuses the teacher's input pipeline (CIFAR-10's own differ by up to 0.04).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_cifar10(root, device):
    """CIFAR-10 as {'train': (x, y), 'test': (x, y)}: uint8 NCHW images and int64 labels on `device`,
    and 'source': "official" (every batch file is the official one, its md5), "synthetic" (the demo's and
    the tests', machinery.write_synthetic_cifar) or "other" (real images, not the official files, such as
    the JPEG copy). Downloaded into `root` on first use; batch files read safely (machinery)."""
    folder = M.download_cifar10(root)
    out, sources = {}, set()
    for split, files in (("train", M.CIFAR10.train_list), ("test", M.CIFAR10.test_list)):
        parts = [M.read_cifar_batch(os.path.join(folder, name), md5) for name, md5 in files]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor([v for p in parts for v in p[1]], dtype=torch.long)
        out[split] = (x.to(device), y.to(device))
        sources |= {p[2] for p in parts}
    out["source"] = sources.pop() if len(sources) == 1 else "other"
    return out


def augment(x, pad, gen):
    """Random crop with `pad` zero pixels each side, then a horizontal flip with p=0.5, for a whole
    uint8 batch on its device (as torchvision's RandomCrop(size, pad) + RandomHorizontalFlip): two
    gathers, rows then columns; reading a crop's columns backwards is the flip."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=gen)
    rows = dy + torch.arange(h, device=x.device)
    cols = dx + torch.arange(w, device=x.device)
    flip = torch.rand(n, 1, device=x.device, generator=gen) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    xp = xp.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))
    return xp.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


_NORM = {}  # device -> (scale, bias), made once: a new tensor per batch would be a host-to-GPU copy


def normalize(x):
    """uint8 images -> float (x/255 - mean)/std in one pass, channels_last (faster convolutions on GPU and CPU)."""
    if x.device not in _NORM:
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        _NORM[x.device] = (1 / (255 * std), -torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) / std)
    scale, bias = _NORM[x.device]
    return torch.addcmul(bias, x.contiguous(memory_format=torch.channels_last), scale)


class Batches:
    """Minibatches of uint8 images held on the device (airbench-style): with `shuffle`, a randperm
    order and no incomplete last batch; with `augment`, crop + flip batched on the device. Yields
    (x, *targets) where targets are per-image tensors (labels, cached teacher logits, ...)."""

    def __init__(self, x, *targets, batch_size, shuffle=False, augment=False, pad=4, gen=None):
        self.x, self.targets, self.batch_size = x, targets, batch_size
        self.shuffle, self.augment, self.pad, self.gen = shuffle, augment, pad, gen

    def __len__(self):
        n = len(self.x)
        return max(1, n // self.batch_size) if self.shuffle else -(-n // self.batch_size)

    def __iter__(self):
        n, bs = len(self.x), self.batch_size
        order = torch.randperm(n, device=self.x.device, generator=self.gen) if self.shuffle else None
        for i in range(len(self)):
            idx = order[i * bs:(i + 1) * bs] if self.shuffle else slice(i * bs, (i + 1) * bs)
            x = self.x[idx]
            if self.augment:
                x = augment(x, self.pad, self.gen)
            yield (normalize(x), *(t[idx] for t in self.targets))

    def subset(self, n, seed=0):
        """The same images' fixed random subset of n (all of them if there are fewer), in order."""
        if n >= len(self.x):
            return self
        idx = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))[:n].sort().values.to(self.x.device)
        return Batches(self.x[idx], *(t[idx] for t in self.targets), batch_size=self.batch_size)


class JointBatches:
    """Each face batch with a CIFAR-10 batch of the same size (a fixed 1:1 ratio), a fresh CIFAR-10 order each epoch."""

    def __init__(self, faces, cifar):
        self.faces, self.cifar = faces, cifar

    def __len__(self):
        return len(self.faces)

    def __iter__(self):
        for (x, y), (xc, yc) in zip(self.faces, self.cifar):
            yield x, y, xc, yc


# =============================================================================
# Data: faces (Q2)
# =============================================================================


def load_faces(folder, subjects=100, per_subject=50, train_per_subject=40, size=64, seed=0):
    """The face task from an image folder `folder/<subject>/<image>` or a pre-split
    `folder/train/<subject>/...` + `folder/test/<subject>/...`: the first `subjects` subjects (natural
    order) with enough readable images, `per_subject` of them picked with `seed`, `train_per_subject`
    for training and the rest for test. Returns {'train': (x, y), 'test': (x, y)} (uint8 NCHW, CPU),
    'files' (the split's file lists), 'subjects' and 'source' (synthetic, DigiFace-1M or a face image folder)."""
    if not os.path.isdir(folder):
        die(f"face folder {folder} does not exist")
    test_per = per_subject - train_per_subject
    presplit = all(os.path.isdir(os.path.join(folder, s)) for s in ("train", "test"))
    top = os.path.join(folder, "train") if presplit else folder
    names = sorted((d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d))), key=M.natural_key)
    if not names:
        die(f"{top} holds no subject folders (expected {top}/<subject>/<image>)")
    chosen, short = [], []
    with ThreadPoolExecutor(8) as pool:  # PIL decodes outside the GIL
        for name in names:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # per subject: stable
            if presplit:
                tr = M.read_subject(os.path.join(folder, "train", name), size, pool)
                te_dir = os.path.join(folder, "test", name)
                te = M.read_subject(te_dir, size, pool) if os.path.isdir(te_dir) else []
                if len(tr) < train_per_subject or len(te) < test_per:
                    short.append(f"{name} ({len(tr)} train, {len(te)} test)")
                    continue
                tr = [tr[i] for i in rng.permutation(len(tr))[:train_per_subject]]
                te = [te[i] for i in rng.permutation(len(te))[:test_per]]
            else:
                ims = M.read_subject(os.path.join(folder, name), size, pool)
                if len(ims) < per_subject:
                    short.append(f"{name} ({len(ims)})")
                    continue
                ims = [ims[i] for i in rng.permutation(len(ims))[:per_subject]]
                tr, te = ims[:train_per_subject], ims[train_per_subject:]
            chosen.append((name, tr, te))
            if len(chosen) == subjects:
                break
    need = f"{train_per_subject} train + {test_per} test" if presplit else f"{per_subject}"
    if short:
        M.warn(f"skipped subjects with fewer than {need} readable images: {', '.join(short[:10])}"
             + (f" and {len(short) - 10} more" if len(short) > 10 else ""))
    if len(chosen) < subjects:
        die(f"{folder}: only {len(chosen)} subjects have at least {need} readable images, "
            f"{subjects} are needed (set SUBJECTS= or add images)")
    out = {"subjects": [c[0] for c in chosen], "files": {}, "source": "synthetic" if os.path.exists(
        os.path.join(folder, ".synthetic")) else "DigiFace-1M" if os.path.exists(os.path.join(folder, ".complete")) else
        "a face image folder"}
    for k, split in ((1, "train"), (2, "test")):
        items = [(p, im, label) for label, c in enumerate(chosen) for p, im in c[k]]
        x = torch.from_numpy(np.stack([im for _, im, _ in items])).permute(0, 3, 1, 2).contiguous()
        out[split] = (x, torch.tensor([label for *_, label in items]))
        out["files"][split] = [p for p, _, _ in items]
    return out


# =============================================================================
# Models: the teacher (Q1 part A), the student (Q1 part B), the two-headed network (Q2)
# =============================================================================


class Float32Linear(nn.Linear):
    """A Linear layer computed in float32 even under autocast: every network's last layer, so that logits (and the
    soft targets softmax(t/T) made from them) are never rounded to 16 bits first."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def teacher_resnet18(num_classes=10, pretrained=True):
    """torchvision's ResNet18 for 32x32 inputs: conv1, the max-pool and conv5_1 (3x3 conv and 1x1
    shortcut) get stride 1, so stages run 32-32-32-16-8-8 and the last feature map is 8x8x512;
    same 17 convolutions, kernel sizes, paddings and single max-pool. `fc` is a new 10-way layer. Of the five
    halvings of ResNet18 (32 -> 1), three go: the stem's two (conv1, the max-pool), made to shrink 224x224 ImageNet
    images fast, and the last stage's, so that conv3_x and conv4_x halve the image as they did in pretraining."""
    model = torchvision.models.resnet18()
    if pretrained:
        model.load_state_dict(M.imagenet_weights())
    model.conv1.stride = (1, 1)  # conv1: stride 2 -> 1 (its output 32x32; 16x16 in the original)
    model.maxpool.stride = 1  # the max-pool: 2 -> 1 (32x32; 8x8 in the original)
    model.layer4[0].conv1.stride = (1, 1)  # conv5_1's first 3x3 conv: 2 -> 1 (conv5_x's output 8x8, not 4x4)
    model.layer4[0].downsample[0].stride = (1, 1)  # and its 1x1 shortcut with it
    model.fc = Float32Linear(512, num_classes)
    return model


def resnet_layers():
    """ResNet-paper names of the teacher's layers -> torchvision modules (a stage conv2_x..conv5_x, or
    one block conv2_1..conv5_2; conv1 includes its BatchNorm)."""
    names = {"conv1": ["conv1", "bn1"]}
    for stage in range(2, 6):
        names[f"conv{stage}_x"] = [f"layer{stage - 1}"]
        names.update({f"conv{stage}_{b}": [f"layer{stage - 1}.{b - 1}"] for b in (1, 2)})
    return names


def layer_parameters(backbone, layer):
    """The parameters of a layer named as in the ResNet paper (resnet_layers) in the teacher's backbone."""
    return [q for m in resnet_layers()[layer] for q in backbone.get_submodule(m).parameters()]


def features(model, x):
    """The teacher's last feature map (before average pooling)."""
    m = model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def load_teacher(path, device=None):
    """The trained teacher from its model.pt (weights only), in eval mode."""
    if not os.path.exists(path):
        die(f"missing teacher checkpoint {path}: run `make teacher` first")
    state = M.load_checkpoint(path)
    model = teacher_resnet18(pretrained=False)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        die(f"{path} is not a checkpoint of this ResNet18 teacher ({str(e).splitlines()[0]})")
    return model.to(device or "cpu").eval()


class StudentCNN(nn.Module):
    """The assignment's student: conv 5x5/32, 3x3/64, 3x3/128 (stride 1, pad 1, ReLU), each followed by
    a 2x2 max-pool with stride 1, then FC 500 (ReLU) and FC 10 (the softmax is in the loss). Sizes:
    32 -conv5-> 30 -pool-> 29 -conv3-> 29 -pool-> 28 -conv3-> 28 -pool-> 27, so 27x27x128 = 93,312 features,
    and the first FC holds 46.7M of the 46,756,742 weights. Options carried over from the teacher: BatchNorm
    after each conv (on, as q1b_kd.py trains it: --bn 1; off, 448 weights fewer), dropout before the last FC (off)."""

    def __init__(self, bn=True, dropout=0.0):
        super().__init__()

        def conv(cin, cout, k):  # the table's row: conv k x k, stride 1, pad 1 (BatchNorm), ReLU; max-pool 2x2, stride 1
            return [nn.Conv2d(cin, cout, k, stride=1, padding=1), *([nn.BatchNorm2d(cout)] if bn else []),
                    nn.ReLU(inplace=True), nn.MaxPool2d(2, stride=1, padding=0)]
        self.features = nn.Sequential(*conv(3, 32, 5), *conv(32, 64, 3), *conv(64, 128, 3))
        self.classifier = nn.Sequential(nn.Linear(27 * 27 * 128, 500), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), Float32Linear(500, 10))

    def forward(self, x):
        # flattened in (h, w, c) order, the order they lie in memory: the same 93,312 features (speed only)
        return self.classifier(self.features(x).permute(0, 2, 3, 1).flatten(1))


def student_groups(students, lr, fc1_rate):
    """Parameter groups of a StudentCNN or of each student of a lock-step group: its first FC (93,312 inputs,
    46.7M weights) at `fc1_rate` times `lr`, its other layers at `lr`."""
    groups = []
    for m in (students if isinstance(students, Students) else [students]):
        fc1 = set(m.classifier[0].parameters())
        groups += [{"params": [q for q in m.parameters() if q not in fc1], "lr": lr},
                   {"params": list(fc1), "lr": lr * fc1_rate}]
    return groups


class Students(nn.ModuleList):
    """Students trained in lock-step on the same batches, one teacher pass for all: forward(x) is every student's
    logits, stacked (K, B, 10). A student in `stopped` (it diverged) is not run: its logits are NaN."""
    stopped = frozenset()

    def forward(self, x):
        logits = {k: m(x).float() for k, m in enumerate(self) if k not in self.stopped}
        nan = torch.full_like(next(iter(logits.values())), math.nan)
        return torch.stack([logits.get(k, nan) for k in range(len(self))])


class ContinualNet(nn.Module):
    """The teacher's backbone shared by two heads: `old` (its 10-way fc, CIFAR-10) and `new` (faces).
    Returns (old logits, new logits). A BatchNorm layer updates its running statistics only when its
    weights are trained and `adapt_bn` is set; frozen layers always run in eval mode."""

    def __init__(self, teacher, new_classes, adapt_bn=False):
        super().__init__()
        self.old, self.adapt_bn = teacher.fc, adapt_bn
        teacher.fc = nn.Identity()
        self.backbone, self.new = teacher, Float32Linear(self.old.in_features, new_classes)

    def forward(self, x):
        f = self.backbone(x)
        return self.old(f), self.new(f)

    def old_task_parameters(self):
        """The backbone and the old head: every weight the old task's output depends on."""
        return [*self.backbone.parameters(), *self.old.parameters()]

    def train(self, mode=True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(mode and self.adapt_bn and m.weight.requires_grad)
        return self


# =============================================================================
# Losses: each a loss function of the training loop, loss_fn(model, x, y, *targets) -> (loss, logits)
# =============================================================================


def cross_entropy(model, x, y, label_smoothing=0.0):
    """The classification loss (the teacher's, Q1 part A)."""
    logits = model(x)
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), logits


def soft_targets(teacher_logits, T):
    """The teacher's soft targets at temperature T: softmax(t/T) (Hinton et al. 2015; T = 1: its own output). Made
    in kd_loss from t = teacher(x) of the very augmented batch (q1b_kd.distill_loss), or in evaluation from the
    teacher's logits on the un-augmented images, computed once (q1b_kd.main); LwF's targets too (soft_cross_entropy)."""
    return F.softmax(teacher_logits.float() / T, dim=-1)


def soft_target_summary(teacher_logits, labels, temperatures):
    """What the soft targets hold at each T, over a set of images: the mean probability of the teacher's
    top class and of the true class, the mean entropy as a fraction of the uniform distribution's, and
    the first image's targets (for the report)."""
    out = {"label": int(labels[0])}
    for T in temperatures:
        p = soft_targets(teacher_logits, T)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])
        out[f"{T:g}"] = {"top": p.max(-1).values.mean().item(), "true": p.gather(1, labels.view(-1, 1)).mean().item(),
                         "entropy": entropy.mean().item(), "example": p[0].tolist()}
    return out


def kd_loss(student_logits, teacher_logits, labels, T, lam):
    """Lecture 7's KD loss (Hinton et al. 2015): lam * T^2 * soft + (1 - lam) * hard. hard: cross-entropy with
    the labels; soft: how far the student's softmax(s/T) is from the teacher's soft targets softmax(t/T),
    summed over classes and averaged over the batch. lam weights the soft term (0: labels only, 1: soft
    targets only); T^2 keeps its gradients comparable across T (they shrink as 1/T^2), so at T = 20, lam = 0.1
    the KL is weighed 0.1 * 400 = 40 against 0.9 for the CE. soft is KL(teacher || student): the soft
    cross-entropy minus the teacher's entropy (a constant), so the same gradients, and 0 when the student
    matches the teacher (a soft cross-entropy would sit near T^2 times that entropy, its curve flat). T is for
    training only: a student's accuracy is that of its raw logits (T = 1), as the assignment's table measures it;
    its recorded loss is this one, at its own T and lam, so losses compare across students only at equal T, lam."""
    if not T > 0 or not 0 <= lam <= 1:
        raise ValueError(f"need T > 0 and 0 <= lam <= 1, got T={T}, lam={lam}")
    p = soft_targets(teacher_logits, T)
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    soft = (torch.xlogy(p, p) - p * log_q).sum(-1).mean()  # sum p log(p/q); xlogy: 0 log 0 = 0
    hard = F.cross_entropy(student_logits.float(), labels)
    return lam * T * T * soft + (1 - lam) * hard


def kd_step(student, teacher, opt, x, y, T, lam, clip=0.0):
    """One KD training step of one student, plainly, at fp32: what a lock-step group (q1b_kd.distill_loss, train_epoch,
    machinery.Step) does for each of its students in one pass (tests/test_step.py holds the two equal)."""
    with torch.no_grad():
        t = teacher(x)  # the soft targets' logits: the teacher in eval mode, no gradient
    loss = kd_loss(student(x), t, y, T, lam)
    opt.zero_grad()
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    opt.step()
    return loss.detach()


def old_task(net, x, y):
    """The old head's CIFAR-10 loss (Q2: the old task)."""
    old = net(x)[0]
    return F.cross_entropy(old.float(), y), old


def new_task(net, x, y):
    """The new head's face-recognition loss (Q2: the new task; feature extraction, fine-tuning, LwF's warm-up)."""
    new = net(x)[1]
    return F.cross_entropy(new.float(), y), new


def soft_cross_entropy(logits, target_logits, T):
    """Cross-entropy between softmax(target_logits/T) and softmax(logits/T), summed over classes and
    averaged over the batch (no T^2 here)."""
    return -(soft_targets(target_logits, T) * F.log_softmax(logits.float() / T, dim=-1)).sum(-1).mean()


def lwf_loss(original, T, lambda_o):
    """LwF's loss in its joint stage (Li & Hoiem, eq. 2-3): CE(new) + lambda_o * CE(softmax(y_o/T), softmax(old/T)),
    where y_o is the ORIGINAL network's old-task output on the same images (no T^2 factor, as in the paper)."""
    def loss(net, x, y):
        old, new = net(x)
        with torch.no_grad():
            y_o = original(x)  # the frozen original (eval mode) on the same augmented batch
        return F.cross_entropy(new.float(), y) + lambda_o * soft_cross_entropy(old, y_o, T), new
    return loss


def joint_loss(net, x, y, x_old, y_old):
    """Joint training's loss (the reference with the old data): CE(new head, faces) + CE(old head, CIFAR-10),
    each task on its own head, a batch of each (JointBatches)."""
    new = net(x)[1]
    return F.cross_entropy(new.float(), y) + F.cross_entropy(net(x_old)[0].float(), y_old), new


def fidelity(student_logits, teacher_logits, labels):
    """Per student: the cross-entropy with the labels (the one loss all students share), the top-1 agreement with
    the teacher (%) and KL(teacher || student) at T = 1 (kd_loss drives it down at the student's own T): how faithful."""
    s, p = student_logits.float(), soft_targets(teacher_logits, 1.0)
    return {"ce": F.cross_entropy(s.movedim(-1, 1), labels.expand(s.shape[:-1]), reduction="none").mean(-1),
            "agree": 100.0 * (s.argmax(-1) == teacher_logits.argmax(-1)).float().mean(-1),
            "kl": (torch.xlogy(p, p) - p * F.log_softmax(s, dim=-1)).sum(-1).mean(-1)}


# =============================================================================
# The training loop
# =============================================================================


def sgd(groups, lr, momentum=0.9, weight_decay=5e-4):
    """SGD with Nesterov momentum over parameter groups (each may carry its own lr); the fused
    kernel where this torch has it (one pass over the weights; docs/design.md, "Speed")."""
    groups, kw = list(groups), dict(lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    try:
        return torch.optim.SGD(groups, fused=True, **kw)
    except (TypeError, RuntimeError):
        return torch.optim.SGD(groups, **kw)


def warmup_cosine(opt, total_steps, warmup_steps):
    """Per-step schedule: linear warm-up to each group's lr, then cosine decay to zero."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _num(t):
    return t.tolist() if t.ndim else t.item()


@torch.no_grad()
def evaluate(model, loss_fn, data, precision="fp32"):
    """{'loss', 'acc' (%), and whatever else loss_fn returns as a third item}: means over `data` of `model` in
    eval mode; per student for a lock-step group."""
    model.eval()
    sums, n = {}, 0
    for x, y, *rest in data:
        with M.autocast(x.device, precision):
            loss, logits, *more = loss_fn(model, x, y, *rest)
        batch = {"loss": loss.float() * len(y), "acc": 100.0 * (logits.argmax(-1) == y).sum(-1),
                 **{key: v * len(y) for key, v in (more[0] if more else {}).items()}}
        for key, v in batch.items():
            sums[key] = sums.get(key, 0) + v
        n += len(y)
    return {key: _num(v / n) for key, v in sums.items()}


@torch.no_grad()
def predict(model, data, precision="fp32"):
    """Logits (float32) of `model` in eval mode over `data`, in order."""
    model.eval()
    out = []
    for x, *_ in data:
        with M.autocast(x.device, precision):
            out.append(model(x).float())
    return torch.cat(out)


def train_epoch(model, loss_fn, sched, data, step, desc=""):
    """One pass of SGD steps over `data`. `step` (machinery.Step) does each on the device, for one model or for every
    student of a lock-step group at once (each on its own gradients); for one model at fp32 its three calls are
    (opt.zero_grad(); loss.backward()), clip_grad_norm_(model.parameters(), clip) and opt.step()."""
    model.train()
    for x, *ys in tqdm(data, desc=desc, leave=False, disable=None):
        with M.autocast(x.device, step.precision):
            loss = loss_fn(model, x, *ys)[0]  # a lock-step group: one loss per student
        step.backward(loss)  # zero the gradients, backward (fp16: the loss scaled)
        step.clip_norms()  # each student's gradients clipped to norm `clip` (0: none)
        step.sgd_step()  # the SGD step; a student whose loss or gradients are not finite takes none
        sched.step()


def fit(model, loss_fn, opt, sched, train, evals, epochs, run, clip=0.0):
    """The one training loop, for the teacher, every student and every Q2 method: train_epoch on `train` for each
    epoch, and before the first and after each, evaluate on each split of `evals` ({split: data, measured with
    loss_fn, or (another loss function, data)}; eval mode, un-augmented; a training set on a fixed EVAL_IMAGES of
    its images, on all after the last epoch). `epochs`: the run's number, or a range of them (a stage with its own
    optimiser and schedule, which continues the run's history). `run` (machinery.Run): the folder, its checkpoints
    and resume, and the config, whose precision applies. `clip`: the gradient norm each model (each student of a
    lock-step group, on its own) is clipped to, 0: none. Returns the history of `epochs`: a row per epoch, and first,
    when they start the run, epoch 0 (before any training). A non-finite loss stops the run; in a lock-step group,
    that student."""
    stage, group = epochs if isinstance(epochs, range) else range(1, epochs + 1), isinstance(model, Students)
    step = M.Step(model, opt, run.precision, clip)  # backward, clip, SGD step
    history = run.resume(model, opt, sched, step, stage)
    for epoch in range(history[-1]["epoch"] + 1 if history else 0, stage.stop):
        t0, row = time.time(), {"epoch": epoch}
        if epoch:
            stopped = step.epoch()
            if group:  # a diverged student leaves the group's passes; when none is left, the run ends
                model.stopped = frozenset(stopped)
                if len(stopped) == len(model):
                    break
            train_epoch(model, loss_fn, sched, train, step, desc=f"epoch {epoch}/{run.epochs}")
            row |= run.diverged(step.bad.tolist(), epoch, history, group)  # stops a single run
        row["lr"] = opt.param_groups[0]["lr"]  # where the schedule stands after the epoch
        for split, e in evals.items():
            fn, data = e if isinstance(e, tuple) else (loss_fn, e)
            data = data if epoch == run.epochs or not split.endswith("train") else data.subset(EVAL_IMAGES)
            row |= {f"{split}_{k}": v for k, v in evaluate(model, fn, data, run.precision).items()}
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        run.record(history, stage.stop - 1)
    first = 0 if stage.start == 1 else stage.start  # epoch 0, before any training, opens the run's first stage
    return [row for row in history if first <= row["epoch"] < stage.stop]
