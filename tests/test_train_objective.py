"""The training objective: the loss terms against hand-computed values, MixToken's token mapping and
the attention-similarity regulariser's pairs."""
import contextlib
import math
import types

import numpy as np
import pytest
import timm
import torch

import refiner  # noqa: F401  (registers the models)
from refiner.config import TrainConfig
from refiner.train import objective
from refiner.train.objective import attn_cos_reg, mix_token_box, soft_ce
from refiner.train.trainer import Trainer


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _ce(row, target):
    return -sum(t * ls for t, ls in zip(target, _log_softmax(row)))


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_soft_ce_and_attention_regulariser_hand_values():
    """Guards the loss functions against values computed by hand here (soft-target cross-entropy,
    the attention-similarity regulariser), so that a change to either shows as a number."""
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    target = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])
    expected = (_ce([1, 2, 3], [0, 0, 1]) + _ce([0.5, -1, 0], [0.2, 0.5, 0.3])) / 2
    assert soft_ce(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # cosine over the head axis at every (image, query, key), averaged, over the first `pairs` pairs
    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 2, 2) for _ in range(4)]

    def pair(a, b):
        vals = [_cos(a[i, :, n, m].tolist(), b[i, :, n, m].tolist()) for i in range(2) for n in range(2)
                for m in range(2)]
        return sum(vals) / len(vals)

    assert attn_cos_reg(maps, 2).item() == pytest.approx((pair(maps[0], maps[1]) + pair(maps[1], maps[2])) / 2)
    assert attn_cos_reg(maps, 12).item() == pytest.approx(sum(pair(maps[i], maps[i + 1]) for i in range(3)) / 3)


class _FakeStep:
    """Stands in for the model's forward_train: fixed outputs, records what it was called with."""

    def __init__(self, B, C, T, with_aux):
        g = torch.Generator().manual_seed(1)
        self.out = {'logits': torch.randn(B, C, generator=g),
                    'attn': [torch.rand(B, 2, 5, 5, generator=g) for _ in range(3)]}
        if with_aux:
            self.out['aux_logits'] = torch.randn(B, T, C, generator=g)
        self.calls = []

    def __call__(self, images, mix_box, want_attn):
        self.calls.append((images.shape, mix_box, want_attn))
        return self.out


@pytest.mark.parametrize('case', ['plain', 'token_labeling', 'mix_token', 'mixup_mix_token'])
def test_training_loss_equals_hand_computed_terms(monkeypatch, case):
    """Trainer._loss (objective.training_loss): class-token CE against the (smoothed, Mixup-mixed)
    target, mixed again by the own-token share under MixToken; + dense_weight · mean CE of every token
    against its image's target; + attn_cos_reg · the attention-similarity term. A loss that drops any term, uses hard
    labels or the wrong MixToken share fails."""
    B, C, grid = 4, 3, (2, 3)  # 8×12 images, patch 4: a 2×3 token grid
    tl = case != 'plain'
    cfg = TrainConfig(model='refiner_vit_nano', token_labeling=tl, mix_token=case.endswith('mix_token'),
                      dense_weight=0.5, attn_cos_reg=0.1, attn_cos_pairs=12, smoothing=0.1, mixup=0.0, cutmix=0.0)
    step = _FakeStep(B, C, grid[0] * grid[1], with_aux=tl)
    targets = torch.tensor([0, 2, 1, 2])
    smooth = [[0.9 + 0.1 / C if c == t else 0.1 / C for c in range(C)] for t in targets.tolist()]
    mixup = None
    if case == 'mixup_mix_token':  # a stand-in for timm's Mixup: fixed mixed targets
        lam = 0.7
        mixed = [[lam * a + (1 - lam) * b for a, b in zip(smooth[i], smooth[B - 1 - i])] for i in range(B)]
        mixup = lambda images, t: (images, torch.tensor(mixed))  # noqa: E731
        soft = mixed
    else:
        soft = smooth
    boxes = []
    monkeypatch.setattr(objective, 'mix_token_box', lambda h, w: boxes.append((h, w)) or ((0, 1, 1, 3), 4 / 6))
    trainer = types.SimpleNamespace(cfg=cfg, mixup=mixup, num_classes=C, step_module=step,
                                    autocast=contextlib.nullcontext(),
                                    model=types.SimpleNamespace(patch_embed=types.SimpleNamespace(patch_size=4)))
    loss = Trainer._loss(trainer, torch.zeros(B, 3, 8, 12), targets).item()

    own = 4 / 6 if cfg.mix_token else 1.0
    assert step.calls == [((B, 3, 8, 12), (0, 1, 1, 3) if cfg.mix_token else None, True)]
    assert boxes == ([grid] if cfg.mix_token else [])
    logits = step.out['logits'].tolist()
    cls_target = [[own * a + (1 - own) * b for a, b in zip(soft[i], soft[B - 1 - i])] for i in range(B)]
    expected = sum(_ce(logits[i], cls_target[i]) for i in range(B)) / B
    if tl:
        aux = step.out['aux_logits'].tolist()
        dense = [_ce(aux[i][t], soft[i]) for i in range(B) for t in range(grid[0] * grid[1])]
        expected += 0.5 * sum(dense) / len(dense)
    maps = step.out['attn']
    cos = [_cos(maps[k][i, :, n, m].tolist(), maps[k + 1][i, :, n, m].tolist())
           for k in range(2) for i in range(B) for n in range(5) for m in range(5)]
    expected += 0.1 * sum(cos) / len(cos)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_mix_token_box_share_is_the_share_of_own_tokens():
    """The class target is mixed by λ' = 1 - (box area)/(h·w), the tokens the image keeps: it must
    be exactly that for the box returned, not the Beta draw before clipping."""
    h, w = 4, 6
    areas = []
    for seed in range(400):
        np.random.seed(seed)
        res = mix_token_box(h, w)
        if res is None:
            continue
        (top, left, bottom, right), own = res
        assert 0 <= top < bottom <= h and 0 <= left < right <= w
        area = (bottom - top) * (right - left)
        assert own == pytest.approx(1 - area / (h * w), abs=1e-12)
        areas.append(area / (h * w))
    assert len(areas) > 200 and len(set(areas)) > 5  # boxes of many sizes
    assert 0.1 < np.mean(areas) < 0.6  # cut area ratio from λ ~ Beta(1, 1), clipped at the borders


def test_forward_train_mix_token_mapping():
    """MixToken: tokens inside the box (top, left, bottom, right) come from the batch-flipped images
    right after the stem, and the per-token outputs are swapped back, so that every token's output
    at image i belongs to image i's own content. Checked on a non-square grid with an off-centre
    box against a loop written out in the test."""
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', img_size=(16, 24), embed_dim=32, depth=2, num_heads=2,
                              num_classes=3, aux_head=True).eval()  # eval: BatchNorm does not mix samples
    x = torch.randn(3, 3, 16, 24)
    top, left, bottom, right = box = (1, 2, 3, 5)  # on the 4×6 grid
    with torch.no_grad():
        out = model.forward_train(x, mix_box=box)
        grid = model.patch_embed(x)  # (B, 4, 6, C)
        B, h, w, _ = grid.shape
        mixed = grid.clone()
        for i in range(B):
            for r in range(top, bottom):
                for c in range(left, right):
                    mixed[i, r, c] = grid[B - 1 - i, r, c]
        t = model._pos_embed(mixed)
        prev = None
        for blk in model.blocks:
            t, prev = blk(t, prev)
        t = model.norm(t)
        torch.testing.assert_close(out['logits'], model.head(t[:, 0]))
        aux = model.aux_head(t[:, 1:])  # (B, h·w, classes), row-major tokens
        back = aux.clone()
        for i in range(B):
            for r in range(top, bottom):
                for c in range(left, right):
                    back[i, r * w + c] = aux[B - 1 - i, r * w + c]
        torch.testing.assert_close(out['aux_logits'], back)
        assert not torch.allclose(out['aux_logits'], aux)  # the swap back did something
        plain = model.forward_train(x)
        assert not torch.allclose(plain['logits'], out['logits'])


def test_attention_regulariser_pairs_of_a_refiner():
    """The maps a Refiner-ViT hands on: a refining block hands its input map on unchanged, so every
    (attention, refining) pair is the same tensor and contributes a constant 1 without gradient,
    as in the authors' code; the (refining, attention) pairs carry the gradient."""
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', img_size=16, embed_dim=32, depth=4, num_heads=2,
                              num_classes=3).train()
    maps = model.forward_train(torch.randn(2, 3, 16, 16), return_attn=True)['attn']
    assert maps[0] is maps[1] and maps[2] is maps[3]
    assert attn_cos_reg(maps[:2], 1).item() == pytest.approx(1.0)
    reg = attn_cos_reg(maps, 12)
    expected = (1.0 + attn_cos_reg(maps[1:3], 1).item() + 1.0) / 3
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    reg.backward()
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0
