"""A training run as a whole: a short run learns, and a resumed run with every heavy augmentation and
loader workers is bit-identical to one that was never stopped."""
import json

import pytest
import torch
from safetensors.torch import load_file

import refiner  # noqa: F401  (registers the models)
from refiner.config import apply_overrides, load_recipe
from refiner.train import train
from refiner.train.trainer import Trainer


def test_training_learns(trained_run):
    """Fixed seed, short budget: the training loss falls and held-out top-1 ends far above the 10%
    of chance (a run whose gradients are zeroed or whose updates are lost stays near 10%)."""
    out, summary = trained_run
    history = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    losses = [h['train_loss'] for h in history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert summary['top1'] >= 80.0, summary
    assert summary['top1'] == history[-1]['top1']


TINY_ARGS = {'patch_size': 4, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}


def _cfg(**overrides):
    return apply_overrides(load_recipe('default'), dict(dict(model_args=dict(TINY_ARGS)), **overrides))


def test_resume_with_mixup_randaugment_erasing_mixtoken_and_workers_is_bit_identical(tmp_path, monkeypatch):
    """A run with Mixup/CutMix, RandAugment, random erasing, flips and token labeling with MixToken,
    interrupted mid-epoch and resumed from its last checkpoint with 2 loader workers, ends with
    the weights of an uninterrupted run without workers, bit for bit."""
    heavy = dict(epochs=2, batch_size=16, train_fraction=0.1, checkpoint_every=3, aa='rand-m9-mstd0.5-inc1',
                 reprob=0.25, mixup=0.8, cutmix=1.0, hflip=0.5, token_labeling=True, mix_token=True, seed=4,
                 model_args=dict(TINY_ARGS, depth=2))
    ref = tmp_path / 'ref'
    train(_cfg(**heavy), out=str(ref), progress=False)

    original = Trainer._step

    def crash_at_step_7(self, images, targets):
        if self.global_step == 7:
            raise KeyboardInterrupt('simulated kill')
        return original(self, images, targets)

    killed = tmp_path / 'killed'
    monkeypatch.setattr(Trainer, '_step', crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(**heavy, workers=2), out=str(killed), progress=False)
    monkeypatch.undo()
    state = torch.load(killed / 'checkpoint.pt', weights_only=True)
    assert (state['global_step'], state['epoch'], state['batch_in_epoch']) == (6, 0, 6)  # resumes mid-epoch
    train(_cfg(workers=2), resume=str(killed), progress=False)
    for name in ('model.safetensors', 'model_ema.safetensors'):
        a, b = load_file(str(ref / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
