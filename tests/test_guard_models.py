"""Guards on the README's model claims: parameter counts and GFLOPs of the table, and position
embeddings resampled to other input sizes, checked against a bicubic resampling written here."""
import numpy as np
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import refiner  # noqa: F401  (registers the models)
from refiner.models.refiner_vit import checkpoint_filter_fn


@pytest.mark.parametrize('name,count', [('refiner_vit_ti', 5_913_572), ('refiner_vit_nano', 1_195_436)])
def test_readme_parameter_counts_of_the_small_variants(name, count):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize('name,size,gflops', [('refiner_vit_ti', 224, 5.06), ('refiner_vit_nano', 32, 0.19),
                                              ('refiner_vit_s', 224, 13.48), ('deit_small_patch16_224', 224, 8.48)])
def test_readme_gflops(name, size, gflops):
    """The table's GFLOPs: forward FLOPs of one image counted by torch.utils.flop_counter (eval)."""
    with torch.device('meta'):  # FLOPs do not depend on the weights' values: skip the slow initialisation
        model = timm.create_model(name)
    model = model.to_empty(device='cpu').eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(1.0 if t.is_floating_point() else 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    assert round(counter.get_total_flops() / 1e9, 2) == gflops


def _cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bicubic_weights(n_in, n_out):
    """(n_out, n_in) weights of antialiased bicubic resampling with half-pixel centres (PIL's and
    PyTorch's ``antialias=True``): the taps within the kernel's support, renormalised at the borders."""
    scale = n_in / n_out
    support, stretch = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        taps = range(max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in))
        w = np.array([_cubic((j - centre + 0.5) * stretch) for j in taps])
        W[i, list(taps)] = w / w.sum()
    return W


def _resampled(pos_embed, old, new):
    """Class token kept; the patch tokens' (old_h, old_w) row-major grid resampled to new."""
    cls, grid = pos_embed[:, :1], pos_embed[0, 1:].double().numpy().reshape(old[0], old[1], -1)
    out = np.einsum('ij,jkc,lk->ilc', _bicubic_weights(old[0], new[0]), grid, _bicubic_weights(old[1], new[1]))
    return torch.cat([cls, torch.from_numpy(out.reshape(1, new[0] * new[1], -1)).to(pos_embed.dtype)], 1)


def test_position_embeddings_resampled_at_load_and_on_the_fly():
    """Weights trained at 32² (an 8×8 grid) loaded into a 48×64 model (12×16 grid), and run as they
    are on 48×64 images: both use the position embeddings that an independent bicubic resampling
    gives (non-square, so that a swapped height and width fails; class token untouched)."""
    torch.manual_seed(0)
    small = timm.create_model('refiner_vit_nano', img_size=32, embed_dim=32, depth=2, num_heads=2,
                              num_classes=5).eval()
    small.pos_embed.data.normal_(0, 1.0)  # embeddings of trained size
    expected = _resampled(small.pos_embed.detach(), (8, 8), (12, 16))
    big = timm.create_model('refiner_vit_nano', img_size=(48, 64), embed_dim=32, depth=2, num_heads=2,
                            num_classes=5).eval()
    big.load_state_dict(checkpoint_filter_fn(small.state_dict(), big))
    torch.testing.assert_close(big.pos_embed.detach(), expected, rtol=1e-5, atol=1e-5)
    # on the fly: the 32² model on 48×64 images equals a model holding the resampled embeddings
    exact = timm.create_model('refiner_vit_nano', img_size=(48, 64), embed_dim=32, depth=2, num_heads=2,
                              num_classes=5).eval()
    state = dict(small.state_dict(), pos_embed=expected)
    exact.load_state_dict(state)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(small.forward_features(x), exact.forward_features(x), rtol=1e-4, atol=1e-4)
        nearest = dict(state, pos_embed=_resampled(small.pos_embed.detach(), (8, 8), (16, 12)).reshape(1, -1, 32))
        exact.load_state_dict(nearest)  # the same values laid out as a 16×12 grid: must differ
        assert not torch.allclose(small.forward_features(x), exact.forward_features(x), rtol=1e-2, atol=1e-2)
