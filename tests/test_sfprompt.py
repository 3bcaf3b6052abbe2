"""SFPrompt: the split model against an independent forward, one round through Flower messages against one joint
autograd step from the equations (local loss, then split loss), EL2N pruning against the formula, bytes accounting,
crash-and-resume, the config, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import TensorDataset

pytest.importorskip("flwr")

from lightning_ext.federated.sfprompt import SplitPromptViT, el2n_keep, split_part  # noqa: E402
from lightning_ext.federated.sfprompt_federation import SFPromptFederation  # noqa: E402

N = 12  # samples per client


def net(prompts=2):
    return SplitPromptViT(img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, cut=[1, 2],
                          num_prompts=prompts, num_classes=3)


class Data(LightningDataModule):
    def __init__(self, i, n=N):
        super().__init__()
        g = torch.Generator().manual_seed(i)
        self.train_set = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3)


def federation(tune="sfprompt", rounds=1, clients=1, **kw):
    torch.manual_seed(0)
    kw.setdefault("batch_size", 64)  # one batch holds a client's whole data: the order of samples cannot matter
    return SFPromptFederation(lambda: net(0 if tune == "full" else 2), lambda i, n: Data(i), clients, rounds,
                              tune=tune, seed=0, **kw)


def independent_forward(m: SplitPromptViT, x, skip_body=False):
    """Written from the timm ViT's parts: tokens [cls ; prompts ; patches] + positions, blocks, norm, token 0."""
    v = m.vit
    patches = v.patch_embed(x)
    tokens = torch.cat([v.cls_token.expand(len(x), -1, -1), patches], 1) + v.pos_embed
    tokens = torch.cat([tokens[:, :1], m.prompts.expand(len(x), -1, -1), tokens[:, 1:]], 1)
    blocks = [b for i, b in enumerate(v.blocks) if not (skip_body and m.cut[0] <= i < m.cut[1])]
    for b in blocks:
        tokens = b(tokens)
    return v.head(v.norm(tokens)[:, 0])


def test_split_forward_equals_an_independent_vit_forward():
    torch.manual_seed(0)
    m = net().eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(m(x), independent_forward(m, x), atol=1e-5)
    assert torch.allclose(m.local_forward(x), independent_forward(m, x, skip_body=True), atol=1e-5)
    assert m.head(x).shape == (4, 1 + 2 + 4, 16)
    assert {split_part(m, k) for k in m.state_dict() if k.startswith("vit.blocks.1.")} == {"body"}
    assert split_part(m, "prompts") == "head" and split_part(m, "vit.head.weight") == "tail"


def _adam_reference(tune, steps):
    """One round of one client written directly: Adam on the trainable set, full-batch cross-entropy for each of
    ``steps`` (``"local"``: logits of head -> tail; ``"split"``: head -> body -> tail)."""
    fed = federation(tune)
    m = net(0 if tune == "full" else 2)
    m.load_state_dict(fed.full_state())
    keys = m.set_trainable(tune)
    opt = torch.optim.Adam([p for n, p in m.named_parameters() if n in keys], lr=1e-3)
    x, y = Data(0).train_set.tensors
    for step in steps:
        opt.zero_grad()
        F.cross_entropy(independent_forward(m, x, skip_body=step == "local"), y).backward()
        opt.step()
    return fed, {k: v for k, v in m.state_dict().items() if k in keys}


@pytest.mark.parametrize("tune, local_loss, steps", [
    ("sfprompt", True, ["local", "split"]), ("sfprompt", False, ["split"]), ("prompt", False, ["split"]),
    ("full", False, ["split"]),
])
def test_one_round_through_messages_equals_joint_autograd(tune, local_loss, steps):
    """Activations up, body output down, gradient up, gradient down: the prompts and tail end where one joint
    backward of the same losses puts them (keep=1, one batch)."""
    fed, expected = _adam_reference(tune, steps)
    fed.keep, fed.local_loss = 1.0, local_loss
    arrays = fed.fit()
    assert sorted(arrays) == sorted(expected)
    for k in expected:
        assert torch.allclose(arrays[k], expected[k], atol=1e-5), k
    frozen = fed.full_state()
    if tune == "sfprompt":  # head weights and body never change; only prompts and tail train
        start = federation(tune).full_state()
        assert all(torch.equal(frozen[k], start[k]) for k in start if k.startswith(("vit.blocks.0", "vit.blocks.1")))


def test_el2n_pruning_keeps_the_hardest_by_the_formula():
    torch.manual_seed(0)
    logits, y = torch.randn(10, 3) * 3, torch.randint(0, 3, (10,))
    from lightning_ext.curation.el2n import el2n_scores

    scores = el2n_scores(torch.nn.Identity(), logits, y)
    rows, labels = logits.tolist(), y.tolist()
    manual = [math.sqrt(sum((math.exp(rows[i][c]) / sum(math.exp(v) for v in rows[i]) - float(c == labels[i])) ** 2
                            for c in range(3))) for i in range(10)]
    assert torch.allclose(scores, torch.tensor(manual), atol=1e-5)
    kept = el2n_keep(scores, 0.7)
    assert kept.tolist() == sorted(sorted(range(10), key=lambda i: -manual[i])[:7])


def test_pruned_round_sends_exactly_the_counted_bytes():
    fed = federation("sfprompt", keep=0.5, batch_size=4, flop_rounds=1)
    fed.fit()
    rec = fed.history[0]
    kept = 6  # ceil(0.5 * 12)
    trainable = sum(v.numel() for v in fed.arrays.values()) * 4
    tokens = 1 + 2 + 4
    per_sample = tokens * 16 * 4  # one activation or gradient of one sample
    assert rec["examples"] == kept
    assert rec["bytes_up_per_client"] == trainable + 2 * kept * per_sample
    assert rec["bytes_per_client"] == 2 * trainable + 4 * kept * per_sample
    assert rec["client_flops_per_client"] > 0


def test_flops_are_counted_only_in_the_first_rounds():
    fed = federation("full", rounds=2, flop_rounds=1)
    fed.fit()
    assert fed.history[0]["client_flops_per_client"] > 0 and fed.history[1]["client_flops_per_client"] is None


def test_crash_and_resume_continues_identically(tmp_path):
    full = federation("sfprompt", rounds=2, clients=2, batch_size=4, keep=0.7).fit()
    path = tmp_path / "sfp.pt"
    federation("sfprompt", rounds=1, clients=2, batch_size=4, keep=0.7, checkpoint_path=path).fit()
    resumed = federation("sfprompt", rounds=2, clients=2, batch_size=4, keep=0.7)
    resumed.load(path)
    out = resumed.fit()
    assert resumed.round == 2 and len(resumed.history) == 2
    for k in full:
        assert torch.equal(full[k], out[k]), k
    with pytest.raises(ValueError, match="tune"):
        federation("full", rounds=2, clients=2).load(path)


def test_sfprompt_config_runs_one_round():
    from pathlib import Path

    import yaml

    from lightning_ext.federated.run import build

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/federated/sfprompt_mnist.yaml").read_text())
    cfg["federation"].update(num_clients=2, local_steps=1)
    fed, test = build(cfg, num_rounds=1)
    arrays = fed.fit()
    assert fed.round == 1 and 0.0 <= test(arrays)["test_acc"] <= 1.0
    cfg["federation"]["strategy_args"]["cut"] = [1, 2]
    with pytest.raises(ValueError, match="unknown sfprompt strategy_args"):
        build(cfg)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cut=[2, 1]), "cut"), (dict(cut=[0, 3]), "cut"), (dict(num_prompts=-1), "num_prompts"),
    (dict(img_size=10), "multiple of patch_size"), (dict(num_heads=3), "divisible"),
])
def test_bad_model_arguments(kwargs, match):
    args = dict(img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, cut=[1, 2])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SplitPromptViT(**args)


def test_bad_federation_arguments():
    for kwargs, match in ((dict(tune="lora"), "tune"), (dict(keep=0.0), "keep"), (dict(lr=float("nan")), "lr"),
                          (dict(local_steps=0), "local_steps"), (dict(checkpoint_path=""), "checkpoint_path")):
        with pytest.raises(ValueError, match=match):
            SFPromptFederation(lambda: net(), lambda i, n: Data(i), 1, 1, **kwargs)
    with pytest.raises(TypeError, match="SplitPromptViT"):
        SFPromptFederation(lambda: torch.nn.Linear(2, 2), lambda i, n: Data(i), 1, 1)
    with pytest.raises(ValueError, match="tune"):
        net().trainable_keys("lora")
    with pytest.raises(ValueError):
        el2n_keep(torch.zeros(0), 0.5)


def test_runner_dispatches_sfprompt_configs():
    from pathlib import Path

    import yaml

    from lightning_ext.federated.run import build

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/federated/sfprompt_mnist.yaml").read_text())
    fed, _ = build(cfg, num_rounds=1)
    assert isinstance(fed, SFPromptFederation) and fed.tune == "sfprompt" and fed.keep == 0.7 and fed.num_rounds == 1


def test_unfused_attention_equals_timms_fused_attention():
    """The model runs attention unfused (so the FLOP counter sees its matmuls); that must not change the function."""
    torch.manual_seed(0)
    m = net().eval()
    x = torch.randn(3, 1, 8, 8)
    unfused = m(x)
    assert all(not b.attn.fused_attn for b in m.vit.blocks)
    for b in m.vit.blocks:
        b.attn.fused_attn = True
    assert torch.allclose(unfused, m(x), atol=1e-5)
