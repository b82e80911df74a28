"LoRA adapters (uas.lora): reference semantics, exactness with B = 0, merging, peft equivalence, counts on Swin-B."

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from uas.backbone import swin3d_b, swin3d_mini
from uas.checkpoint import CheckpointError, load_backbone
from uas.lora import (LORA_TARGETS, LoRAAdapter, LoRALinear, add_lora, from_reference_lora_names, is_lora_name,
                      load_lora_state_dict, lora_layers, lora_state_dict, merge_lora, unmerge_lora)

torch.set_num_threads(1)
CLIP = torch.Generator().manual_seed(1)
CLIP = torch.randn(1, 3, 8, 64, 64, generator=CLIP)


def mini(seed=0):
    torch.manual_seed(seed)
    return swin3d_mini().eval()


def randomise_b(model, std=0.01, seed=1):
    "Give every adapter a nonzero B, so that it changes the output."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('lora_B.weight'): p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope='module')
def base_output():
    with torch.no_grad(): return mini()(CLIP)


@pytest.mark.parametrize('targets', list(LORA_TARGETS))
def test_b_zero_is_exactly_the_base_model(targets, base_output):
    model = add_lora(mini(), rank=4, targets=targets)
    with torch.no_grad(): assert torch.equal(model(CLIP), base_output)
    with torch.no_grad(): assert not torch.equal(randomise_b(model)(CLIP), base_output)   # the adapters are on the path


def test_q_and_v_adapters_equal_the_direct_update():
    model = randomise_b(add_lora(mini(), rank=4, alpha=8), std=0.1)
    layer = model.layers[1].blocks[1].attn.qkv
    assert isinstance(layer, LoRALinear) and sorted(layer.slots) == ['lora_q', 'lora_v']
    C = layer.in_features
    x = torch.randn(3, 10, C)
    W, b = layer.weight.detach(), layer.bias.detach()
    with torch.no_grad():
        out = layer(x)
        for i, name in enumerate(['lora_q', None, 'lora_v']):
            Wi = W[i * C:(i + 1) * C].clone()
            if name is not None:
                a = getattr(layer, name)
                assert a.scale == 2.0
                Wi += a.scale * a.lora_B.weight @ a.lora_A.weight
            torch.testing.assert_close(out[..., i * C:(i + 1) * C], x @ Wi.T + b[i * C:(i + 1) * C], atol=1e-5, rtol=1e-5)
        # k is untouched, bit for bit
        assert torch.equal(out[..., C:2 * C], F.linear(x, W[C:2 * C], b[C:2 * C]))


def test_output_and_mlp_adapters_follow_the_reference():
    model = randomise_b(add_lora(mini(), rank=2, targets='all'), std=0.1)
    block = model.layers[0].blocks[0]
    proj, fc1, fc2 = block.attn.proj, block.mlp.fc1, block.mlp.fc2
    x = torch.randn(4, proj.in_features)
    h = torch.randn(4, fc2.in_features)
    with torch.no_grad():
        base = F.linear(x, proj.weight, proj.bias)
        torch.testing.assert_close(proj(x), base + proj.lora_o(base))          # proj(x) + B(A(proj(x)))
        torch.testing.assert_close(fc1(x), F.linear(x, fc1.weight, fc1.bias) + fc1.lora_fc1(x))
        torch.testing.assert_close(fc2(h), F.linear(h, fc2.weight, fc2.bias) + fc2.lora_fc2(h))
    assert sorted(block.attn.qkv.slots) == ['lora_k', 'lora_q', 'lora_v']


def test_base_names_kept_and_only_adapters_train():
    model = mini()
    names = set(model.state_dict())
    add_lora(model, rank=4, targets='all')
    assert names <= set(model.state_dict())
    assert {n for n in model.state_dict() if not is_lora_name(n)} == names
    assert all(p.requires_grad == is_lora_name(n) for n, p in model.named_parameters())
    # an official checkpoint still loads after add_lora: only the adapters are missing from it
    report = load_backbone(model, mini(seed=3).state_dict(), strict=False)
    assert sorted(report.missing) == sorted(n for n in model.state_dict() if is_lora_name(n))
    assert report.unexpected == [] and report.mismatched == []
    assert torch.equal(model.layers[2].blocks[0].attn.qkv.weight, mini(seed=3).layers[2].blocks[0].attn.qkv.weight)


def test_one_backward_reaches_exactly_the_adapters():
    model = randomise_b(add_lora(mini(), rank=4, targets='qkvo')).train()
    model(CLIP).square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {n for n, p in model.named_parameters() if is_lora_name(n)}


@pytest.mark.parametrize('stages, expected', [('all', [0, 1, 2, 3]), ('first', [0]), ('last', [3]), ([1, 2], [1, 2])])
def test_stages(stages, expected):
    model = add_lora(mini(), rank=2, stages=stages)
    assert sorted({int(n.split('.')[1]) for n in lora_layers(model)}) == expected
    assert model.lora_config['stages'] == expected


def test_merge_is_close_and_unmerge_is_bit_exact():
    model = randomise_b(add_lora(mini(), rank=4, alpha=8, targets='all'))
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(CLIP)
        merged = merge_lora(model)(CLIP)
        assert all(layer.merged for layer in lora_layers(model).values())
        assert not torch.equal(model.layers[0].blocks[0].attn.qkv.weight, originals['layers.0.blocks.0.attn.qkv.weight'])
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
        # a merged model still saves its original weights, and loading into it unmerges it first
        assert all(torch.equal(v, originals[k]) for k, v in model.state_dict().items())
        unmerge_lora(model)
        assert all(torch.equal(p, originals[k]) for k, p in model.named_parameters())
        assert torch.equal(model(CLIP), unmerged)
        merge_lora(model).load_state_dict(originals)
        assert not any(layer.merged for layer in lora_layers(model).values())
        assert torch.equal(model(CLIP), unmerged)


def test_merged_model_costs_a_plain_linear():
    layer = LoRALinear(nn.Linear(6, 18), {'lora_qkv': LoRAAdapter(6, 18, rank=2)})
    nn.init.normal_(layer.lora_qkv.lora_B.weight)
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        torch.testing.assert_close(F.linear(x, layer.weight, layer.bias), expected)


def test_fused_qkv_equals_peft():
    peft = pytest.importorskip('peft')
    ours = add_lora(mini(), rank=4, alpha=8, targets='fused_qkv', init='kaiming')
    randomise_b(ours, std=0.05)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=['qkv'], lora_dropout=0.0), mini())
    theirs.eval()
    sd = theirs.state_dict()
    mapped = {}
    for name, value in lora_state_dict(ours).items():
        prefix, factor = name.split('.lora_qkv.')          # '...attn.qkv', 'lora_A.weight'
        key = f"{prefix}.{factor.split('.')[0]}.default.weight"
        assert key in sd and sd[key].shape == value.shape
        mapped[key] = value
    assert len(mapped) == len([k for k in sd if '.lora_' in k])
    theirs.load_state_dict(mapped, strict=False)
    with torch.no_grad(): a, b = ours(CLIP), theirs(CLIP)
    assert torch.equal(a, b)                                   # same operations in the same order: bit for bit
    n_peft = sum(p.numel() for n, p in theirs.named_parameters() if 'lora_' in n)
    assert n_peft == sum(p.numel() for p in ours.parameters() if p.requires_grad)


def test_kaiming_and_normal_init():
    torch.manual_seed(0)
    normal, kaiming = LoRAAdapter(256, 256, 8), LoRAAdapter(256, 256, 8, init='kaiming')
    assert abs(normal.lora_A.weight.std().item() - 1) < 0.05
    assert kaiming.lora_A.weight.abs().max() <= 1 / 16 + 1e-6
    assert torch.count_nonzero(normal.lora_B.weight) == 0 and torch.count_nonzero(kaiming.lora_B.weight) == 0


def test_bad_arguments_say_what_is_wrong():
    model = add_lora(mini(), rank=2)
    with pytest.raises(ValueError, match='already has LoRA'): add_lora(model, rank=2)
    with pytest.raises(ValueError, match="unknown LoRA targets 'qo'"): add_lora(mini(), rank=2, targets='qo')
    with pytest.raises(ValueError, match="'all', 'first', 'last'"): add_lora(mini(), rank=2, stages='middle')
    with pytest.raises(ValueError, match='positive integer'): add_lora(mini(), rank=0)
    with pytest.raises(TypeError, match='SwinTransformer3D'): add_lora(nn.Linear(3, 3), rank=2)


def test_adapter_weights_round_trip_and_reference_names(tmp_path):
    model = randomise_b(add_lora(mini(), rank=4, targets='all'))
    with torch.no_grad(): expected = model(CLIP)
    torch.save(lora_state_dict(model), tmp_path / 'adapters.pth')
    saved = torch.load(tmp_path / 'adapters.pth', weights_only=True)
    fresh = add_lora(mini(), rank=4, targets='all')
    # the reference fork's names: attn.lora_q / attn.lora_o / mlp.lora_fc1 beside the layers
    reference = {k.replace('attn.qkv.lora_', 'attn.lora_').replace('attn.proj.lora_o', 'attn.lora_o')
                  .replace('mlp.fc1.lora_fc1', 'mlp.lora_fc1').replace('mlp.fc2.lora_fc2', 'mlp.lora_fc2'): v for k, v in saved.items()}
    assert from_reference_lora_names(reference).keys() == saved.keys()
    load_lora_state_dict(fresh, reference)
    with torch.no_grad(): assert torch.equal(fresh(CLIP), expected)
    with pytest.raises(CheckpointError, match=r'missing \(\d+\).*\n.*the same targets and stages'):
        load_lora_state_dict(add_lora(mini(), rank=4, targets='qv'), {})
    with pytest.raises(CheckpointError, match=r'wrong shape \(\d+\): .*checkpoint \(4, 32\) vs model \(2, 32\)(.|\n)*the same rank'):
        load_lora_state_dict(add_lora(mini(), rank=2, targets='all'), saved)
    assert fresh.lora_config == dict(rank=4, alpha=4, stages=[0, 1, 2, 3], init='normal', targets='all')
    assert add_lora(mini(), rank=2, targets=['q', 'o']).lora_config['targets'] == ['q', 'o']     # plain data for a model file


@pytest.fixture(scope='module')
def swin_b_lora():
    torch.manual_seed(0)
    return add_lora(swin3d_b(), rank=32, targets='qv')


def test_swin_b_reference_lora_count(swin_b_lora):
    adapters = {n: p.numel() for n, p in swin_b_lora.named_parameters() if p.requires_grad}
    assert sum(adapters.values()) == 1_540_096                    # + 105,575 head = 1,645,671 (test_model)
    assert len(lora_layers(swin_b_lora)) == 24                      # every block of the 2, 2, 18, 2 stages
    assert len(adapters) == 24 * 2 * 2                              # q and v, A and B
    assert adapters['layers.3.blocks.1.attn.qkv.lora_v.lora_B.weight'] == 1024 * 32
    assert sum(p.numel() for p in swin_b_lora.parameters()) - sum(adapters.values()) == 87_638_984


def test_swin_b_adapter_file_is_a_few_mb(swin_b_lora, tmp_path):
    torch.save(lora_state_dict(swin_b_lora), tmp_path / 'lora.pth')
    size = (tmp_path / 'lora.pth').stat().st_size
    assert 1_540_096 * 4 <= size < 1_540_096 * 4 + 200_000          # 6.2 MB, not the backbone's 350 MB
