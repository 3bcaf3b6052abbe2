"""SFPrompt (issue 27): one-off central diagnostics behind the page's set-up notes (prints only; writes nothing).

Each line is one central epoch (Adam, batch 32, seed 0) on the 3,600 MNIST-5k training images from the cached
backbone of ``benchmarks/sfprompt.py`` (``--pretrain_n 55000 --pretrain_epochs 2``), scored on the 400 validation
images:

- logistic regression on raw pixels (a floor for "learns the task quickly");
- full fine-tuning with a fresh classifier instead of the pretrained Fashion-MNIST one (lr 1e-3, 3e-3);
- SFPrompt's trainable set (prompts + tail) through the whole model, and through its local-loss model (body skipped),
  then scored through the whole model; the prompt arm's set (prompts + final norm + classifier) at lr 1e-3 and 1e-2.

    nice -n 10 python benchmarks/sfprompt_diagnostics.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sfprompt import CachedMNIST5k, evaluate_accuracy, pretrained_path, vit  # noqa: E402
from lightning_ext.federated.client import seeded  # noqa: E402


def epoch(net, params, forward, x, y, lr):
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    losses = []
    net.train()
    for b in torch.randperm(len(x), generator=gen).split(32):
        opt.zero_grad()
        loss = F.cross_entropy(forward(x[b]), y[b])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dm = CachedMNIST5k()
    dm.setup()
    x, y = dm.train_set.tensors
    xv, yv = dm.val_set.tensors
    pre = torch.load(pretrained_path(55000, 2), weights_only=True)

    with seeded(0):
        lin = torch.nn.Linear(784, 10)
    epoch(lin, list(lin.parameters()), lambda t: lin(t.flatten(1)), x, y, 1e-3)
    print(f"logistic regression, 1 epoch: val {(lin(xv.flatten(1)).argmax(1) == yv).float().mean():.3f}")

    for lr in (1e-3, 3e-3):  # full fine-tuning, fresh classifier
        with seeded(0):
            net = vit(0)
        init = net.state_dict()
        init.update({k: v for k, v in pre.items() if not k.startswith("vit.head.")})
        net.load_state_dict(init)
        epoch(net, list(net.parameters()), net, x, y, lr)
        print(f"full fine-tuning, fresh classifier, lr {lr:g}, 1 epoch: val {evaluate_accuracy(net, xv, yv):.3f}")

    for tune, forward, lr in (("sfprompt", "forward", 1e-3), ("sfprompt", "local_forward", 1e-3),
                              ("prompt", "forward", 1e-3), ("prompt", "forward", 1e-2)):
        with seeded(0):
            net = vit(10)
        init = net.state_dict()
        init.update({k: v for k, v in pre.items() if k.startswith("vit.")})
        net.load_state_dict(init)
        keys = set(net.set_trainable(tune))
        losses = epoch(net, [p for n, p in net.named_parameters() if n in keys], getattr(net, forward), x, y, lr)
        print(f"{tune} set through {forward}, lr {lr:g}, 1 epoch: first loss {losses[0]:.2f}, last 10 "
              f"{sum(losses[-10:]) / 10:.2f}, val through the whole model {evaluate_accuracy(net, xv, yv):.3f}")


if __name__ == "__main__":
    main()
