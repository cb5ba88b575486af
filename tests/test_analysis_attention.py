"""refiner.analysis.attention_maps and .plots: attention maps and the stages of their refinement
reproduce each block, the diversity metrics, and the attention figure."""
import pytest
import timm
import torch
from conftest import tiny_refiner as _tiny_refiner
from conftest import tiny_vit as _tiny_vit

import refiner  # noqa: F401  (registers refiner_vit_*)
from refiner.analysis import (
    AttentionDiversity,
    NoAttentionError,
    attention_maps,
    cross_block_similarity,
    head_similarity,
    plot_attention_grid,
)


def _maps_and_attn_io(model, x, index):
    """attention_maps(model, x), and the input and output of block ``index``'s attention in a plain forward."""
    io = {}

    def hook(module, args, output):
        io['x'], io['out'] = args[0], output

    handle = model.blocks[index].attn.register_forward_hook(hook)
    maps = attention_maps(model, x)
    model(x)
    handle.remove()
    return maps, io


def test_refiner_attention_maps_and_stages_reproduce_the_block():
    model = _tiny_refiner()
    maps, io = _maps_and_attn_io(model, torch.randn(2, 3, 16, 16), 1)
    assert [b['kind'] for b in maps] == ['attention', 'refining', 'attention', 'refining']
    blk, attn = maps[1], model.blocks[1].attn
    assert set(blk) >= {'attn', 'before', 'expanded', 'local', 'reduced'}
    assert blk['expanded'].shape == (2, 6, 17, 17) and blk['attn'].shape == (2, 2, 17, 17)
    torch.testing.assert_close(blk['before'], maps[0]['attn'])  # the handed-over map
    torch.testing.assert_close(attn.refine_norm(blk['reduced']) * attn.refine_scale, blk['attn'])
    # the refined map, applied to the block's own V, gives the block's attention output
    B, N, C = io['x'].shape
    v = attn.qkv(io['x']).view(B, N, 2, 16).transpose(1, 2)  # (B, H, N, d)
    out = attn.proj((blk['attn'] @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, io['out'][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(blk['attn'], blk['before'])


@pytest.mark.parametrize('mode', ['inverted_residual', 'linear'])
def test_refinement_stages_after_folding(mode):
    model = _tiny_refiner(refine_mode=mode)
    x = torch.randn(2, 3, 16, 16)
    before = attention_maps(model, x)
    model.reparameterize()  # norms and the ×s folded into the convolutions ('linear': one dense conv)
    after = attention_maps(model, x)
    torch.testing.assert_close(after[1]['attn'], before[1]['attn'], rtol=1e-4, atol=1e-5)
    assert ('expanded' in after[1]) == (mode == 'inverted_residual') and 'local' in after[1]


def test_timm_vit_attention_maps_reproduce_the_block():
    vit = _tiny_vit()
    maps, io = _maps_and_attn_io(vit, torch.randn(2, 3, 16, 16), 1)
    assert [b['kind'] for b in maps] == ['attention', 'attention'] and 'before' not in maps[1]
    A = maps[1]['attn']
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 2, 17))
    attn = vit.blocks[1].attn
    B, N, C = io['x'].shape
    v = attn.qkv(io['x']).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((A @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, io['out'], rtol=1e-4, atol=1e-5)


def test_retrofitted_vit_has_refinement_stages():
    vit = refiner.refine_vit(_tiny_vit(), blocks=[1])
    maps = attention_maps(vit, torch.randn(2, 3, 16, 16))
    assert [b['kind'] for b in maps] == ['attention', 'attention+refine']
    # zero-initialised refinement: the refined map equals the block's own softmax map
    torch.testing.assert_close(maps[1]['attn'], maps[1]['before'])
    torch.testing.assert_close(maps[1]['before'].sum(-1), torch.ones(2, 2, 17))


def test_diversity_metrics():
    a = torch.rand(3, 4, 5, 5).softmax(-1)
    same_heads = a[:, :1].expand(3, 4, 5, 5)
    torch.testing.assert_close(head_similarity(same_heads), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(cross_block_similarity(a, a), torch.ones(3, dtype=torch.float64))
    assert head_similarity(a[:, :1]) is None
    hs = head_similarity(torch.randn(3, 4, 5, 5))
    assert ((hs >= -1) & (hs <= 1)).all()
    acc = AttentionDiversity()
    acc.update(attention_maps(_tiny_refiner(), torch.randn(2, 3, 16, 16)))
    rows = acc.compute()
    assert rows[0]['cross_block_similarity'] is None and 'head_similarity_before' not in rows[0]
    assert rows[1]['cross_block_similarity_before'] == pytest.approx(1.0)  # reuses the previous map


def test_attention_maps_needs_attention_blocks():
    with pytest.raises(NoAttentionError, match='no transformer blocks'):
        attention_maps(timm.create_model('resnet18'), torch.randn(1, 3, 32, 32))


def test_attention_grid_diverging_for_negative_maps(tmp_path):
    maps = {'before refinement': torch.rand(2, 17, 17), 'refined': torch.randn(2, 17, 17)}
    path = plot_attention_grid(torch.rand(3, 16, 16), maps, 6, (4, 4), tmp_path / 'g.png', block=1)
    assert path.stat().st_size > 5000
