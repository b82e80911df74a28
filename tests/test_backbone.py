"Our SwinTransformer3D against torchvision's swin3d_* at equal weights: features, gradients, both attention paths."
import pytest
import torch
import torchvision
from torchvision.ops import StochasticDepth

import uas.backbone as bb
from uas.bench import torchvision_features

torch.set_num_threads(1)  # the test machine is shared: one thread each


def twins(arch, seed=0):
    "torchvision's `arch` with random weights, no stochastic depth, and ours with the same weights."
    torch.manual_seed(seed)
    tv = getattr(torchvision.models.video, arch)()
    for m in tv.modules():
        if isinstance(m, StochasticDepth): m.p = 0.
    ours = getattr(bb, arch)(drop_path_rate=0.)
    ours.load_state_dict(convert(tv))
    return tv, ours


def convert(tv): return bb.convert_torchvision_state_dict(tv.state_dict())


def check_features(arch, shape, tol=1e-4):
    "Eval-mode features of both attention paths equal torchvision's within `tol`; returns the differences."
    tv, ours = twins(arch)
    tv.eval(); ours.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = torchvision_features(tv, x)
        diffs = {fast: (ours.set_fast(fast)(x) - expected).abs().max().item() for fast in (True, False)}
    print(f'{arch} {shape} eval max abs diff (fast, math): {diffs[True]:.2e}, {diffs[False]:.2e}')
    assert max(diffs.values()) <= tol, diffs
    return diffs


def check_gradients(arch, shape, rtol=1e-4):
    "Train mode, drop path 0: every parameter's gradient (both paths) within `rtol * max|g_tv|` of torchvision's."
    tv, ours = twins(arch)
    tv.train(); ours.train()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = torchvision_features(tv, x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward()
    expected = bb.convert_torchvision_state_dict({n: p.grad for n, p in tv.named_parameters() if not n.startswith('head')})
    worst = {}
    for fast in (True, False):
        ours.zero_grad()
        (ours.set_fast(fast)(x) * weight).sum().backward()
        for name, p in ours.named_parameters():
            g = expected[name]
            rel = ((p.grad - g).abs().max() / g.abs().max()).item()
            assert rel <= rtol, (fast, name, rel)
            worst[fast] = max(worst.get(fast, 0.), rel)
    print(f'{arch} {shape} train worst relative gradient diff (fast, math): {worst[True]:.2e}, {worst[False]:.2e}')
    return worst


def test_parameter_counts():
    with torch.device('meta'):  # shapes only
        counts = {a: sum(p.numel() for p in getattr(bb, a)().parameters()) for a in ('swin3d_t', 'swin3d_s', 'swin3d_b', 'swin3d_l')}
        tvs = {a: getattr(torchvision.models.video, a)() for a in ('swin3d_t', 'swin3d_s', 'swin3d_b')}
    assert counts == dict(swin3d_t=27_850_470, swin3d_s=49_509_078, swin3d_b=87_638_984, swin3d_l=196_339_116)
    for arch, tv in tvs.items():
        assert counts[arch] == sum(p.numel() for n, p in tv.named_parameters() if not n.startswith('head'))


def test_official_names():
    keys = set(bb.swin3d_t().state_dict())
    for key in ('patch_embed.proj.weight', 'patch_embed.norm.bias', 'layers.0.blocks.1.norm1.weight', 'layers.0.blocks.1.attn.qkv.weight',
                'layers.2.blocks.5.attn.proj.bias', 'layers.3.blocks.0.attn.relative_position_bias_table', 'layers.1.blocks.0.norm2.weight',
                'layers.1.blocks.0.mlp.fc1.weight', 'layers.1.blocks.0.mlp.fc2.bias', 'layers.2.downsample.reduction.weight',
                'layers.2.downsample.norm.weight', 'norm.weight'):
        assert key in keys, key
    assert not any('relative_position_index' in k or k.startswith('head') for k in keys)
    assert isinstance(bb.swin3d_t().layers[0].blocks[0].attn.qkv, torch.nn.Linear)


def test_conversion_is_complete():
    tv = torchvision.models.video.swin3d_t()
    converted = convert(tv)
    assert set(converted) == set(bb.swin3d_t().state_dict())
    with pytest.raises(KeyError, match='classifier.weight'): bb.convert_torchvision_state_dict({'classifier.weight': torch.zeros(1)})


def test_features_swin3d_t_small():
    check_features('swin3d_t', (1, 3, 10, 52, 68))


def test_gradients_swin3d_t_small():
    check_gradients('swin3d_t', (1, 3, 18, 60, 60))  # 9x15x15 tokens: shifts, masks and padding in time too


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['swin3d_t', 'swin3d_b'])
def test_gradients_not_multiple_of_window(arch):
    check_gradients(arch, (1, 3, 18, 100, 130))


@pytest.mark.slow
def test_features_swin3d_t_32x224x224():
    check_features('swin3d_t', (1, 3, 32, 224, 224))


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['swin3d_t', 'swin3d_b'])
def test_features_not_multiple_of_window(arch):
    check_features(arch, (2, 3, 18, 100, 130))



def test_output_shape_and_pool():
    model = bb.swin3d_mini().eval()
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        features = model(x)
        assert features.shape == (2, model.num_features, 4, 2, 2)
        torch.testing.assert_close(model.forward_pooled(x), features.mean((2, 3, 4)))
        assert bb.pool(features).shape == (2, model.num_features)


def test_frozen_stages():
    model = bb.swin3d_mini(frozen_stages=1).train()
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())
    assert not model.layers[0].training and model.layers[1].training


def test_fast_equals_math_mini_batch():
    "Several clips with shifted windows (the fused path attends one clip at a time), eval and train with gradients."
    model = bb.swin3d_mini(drop_path_rate=0.)
    x = torch.randn(3, 3, 8, 72, 56)  # 4x18x14 tokens: padding in H and W
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.set_fast(True)(x), model.set_fast(False)(x), atol=1e-4, rtol=0)
    model.train()
    grads = []
    for fast in (True, False):
        model.zero_grad()
        y = model.set_fast(fast)(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        assert (grads[0][name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_drop_path_same_seed():
    "With drop path on, the fast and the math path drop the same branches under the same seed."
    model = bb.swin3d_mini(drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 8, 64, 64)
    outs, grads = [], []
    for fast in (True, False):
        model.zero_grad()
        torch.manual_seed(5)
        y = model.set_fast(fast)(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()  # (a sum of squares of a LayerNorm output has ~0 gradient)
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)
    for g_fast, g_math in zip(*grads): assert (g_fast - g_math).abs().max() <= 1e-4 * g_math.abs().max()
    torch.manual_seed(6)
    with torch.no_grad(): assert (model(x) - outs[0]).abs().max() > 1e-2  # drop path really is active


def test_frozen_bias_cache_follows_weights():
    frozen, other = bb.swin3d_mini().eval().requires_grad_(False), bb.swin3d_mini().eval()
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        before = frozen(x)
        assert all(m._bias_cache for m in frozen.modules() if isinstance(m, bb.WindowAttention3D))
        frozen.load_state_dict(other.state_dict())
        after = frozen(x)
        torch.testing.assert_close(after, other.set_fast(False)(x), atol=1e-4, rtol=0)
        assert (after - before).abs().max() > 1e-2


def test_inference_caches_then_training():
    "Caches filled under inference_mode still serve a later training pass (e.g. LoRA: inputs need gradients)."
    model = bb.swin3d_mini().train().requires_grad_(False)
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.inference_mode(): model(x)
    x.requires_grad_(True)
    model(x).square().mean().backward()
    assert x.grad.abs().sum() > 0


def test_use_checkpoint_same_gradients():
    torch.manual_seed(0)
    model = bb.swin3d_mini(drop_path_rate=0.)
    x = torch.randn(1, 3, 8, 64, 64)
    model(x).square().mean().backward()
    expected = model.layers[0].blocks[1].attn.qkv.weight.grad.clone()
    checkpointed = bb.swin3d_mini(drop_path_rate=0., use_checkpoint=True)
    checkpointed.load_state_dict(model.state_dict())
    checkpointed(x).square().mean().backward()
    torch.testing.assert_close(checkpointed.layers[0].blocks[1].attn.qkv.weight.grad, expected)
