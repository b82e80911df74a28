"The paper's optimisation recipe in uas.train: mmcv parameter groups, the warm-up + cosine schedule, accumulation, seeding."
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from helpers import paper_rule
from uas.model import build_recognizer
from uas.train import (PAPER_CUSTOM_KEYS, GradientAccumulator, describe_param_groups, match_custom_key,
                       paper_lr_factor, paper_param_groups, paper_schedule, seed_everything)


def check_paper_rules(model):
    "Every trainable parameter appears exactly once, with the lr and decay of `paper_rule`; return the table."
    table = describe_param_groups(paper_param_groups(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert table.index.is_unique and sorted(table.index) == sorted(trainable)
    for name, row in table.iterrows():
        assert (row.lr, row.weight_decay) == pytest.approx(paper_rule(name)), name
    return table


def tiny_recognizer(mode='full', **kw):
    "The real recognizer on a small Video Swin (2M parameters)."
    return build_recognizer('swin3d_mini', num_classes=5, mode=mode, **kw)


# --- mmcv's custom_keys rule -------------------------------------------------------------------------------------------

def test_custom_key_longest_first_then_alphabetical():
    assert match_custom_key('backbone.layers.1.blocks.0.norm2.bias') == 'backbone'
    assert match_custom_key('backbone.layers.1.downsample.norm.weight') == 'backbone'
    assert match_custom_key('backbone.layers.3.blocks.1.attn.relative_position_bias_table') == 'relative_position_bias_table'
    assert match_custom_key('backbone.absolute_pos_embed') == 'absolute_pos_embed'
    assert match_custom_key('cls_head.fc_cls.weight') is None
    assert match_custom_key('head.norm.weight') == 'norm'
    assert match_custom_key('xy.ab', {'ab': {}, 'xy': {}}) == 'ab'
    assert match_custom_key('xy.ab', {'ab': {}, 'xy': {}, 'y.a': {}}) == 'y.a'  # substring of the full name, dots included


def test_paper_groups_full_tiny():
    table = check_paper_rules(tiny_recognizer())
    assert table.numel.sum() == sum(p.numel() for p in tiny_recognizer().parameters() if p.requires_grad)
    # backbone norms keep their decay: mmcv's `backbone` key is tried before `norm`
    assert (table.loc[[n for n in table.index if 'norm' in n], 'weight_decay'] == 0.05).all()


def test_paper_groups_lora_tiny():
    table = check_paper_rules(tiny_recognizer('lora', lora_rank=4))
    assert {n.split('.')[0] for n in table.index} == {'backbone', 'cls_head'}
    assert all('.lora_' in n for n in table.index if n.startswith('backbone.'))


def test_paper_groups_merge_equal_settings_and_keep_names():
    model = tiny_recognizer()
    groups = paper_param_groups(model)
    settings = np.array(sorted((g['lr'], g['weight_decay']) for g in groups))
    np.testing.assert_allclose(settings, [(3e-5, 0.05), (3e-4, 0.0), (3e-4, 0.05)], rtol=1e-12)
    named = dict(model.named_parameters())
    for g in groups:
        assert len(g['params']) == len(g['param_names'])
        assert all(named[n] is p for n, p in zip(g['param_names'], g['params']))


def test_paper_groups_base_lr_and_custom_keys():
    groups = paper_param_groups(tiny_recognizer(), lr=1e-3, weight_decay=0.1, custom_keys={'backbone': dict(lr_mult=0.5)})
    np.testing.assert_allclose(sorted((g['lr'], g['weight_decay']) for g in groups), [(5e-4, 0.1), (1e-3, 0.1)], rtol=1e-12)
    assert PAPER_CUSTOM_KEYS['backbone'] == dict(lr_mult=0.1)


def test_clean_recipe_applies_every_rule():
    table = describe_param_groups(paper_param_groups(tiny_recognizer(), recipe='clean'))
    for name, row in table.iterrows():
        in_norm = any(f'{n}.' in name for n in ('norm1', 'norm2', 'patch_embed.norm', 'downsample.norm', 'backbone.norm'))
        no_decay = in_norm or 'relative_position_bias_table' in name
        expected = (3e-5 if name.startswith('backbone.') else 3e-4, 0.0 if no_decay else 0.05)
        assert (row.lr, row.weight_decay) == pytest.approx(expected), name


def test_frozen_parameters_are_left_out():
    model = tiny_recognizer('uas')
    groups = paper_param_groups(model)
    assert [g['param_names'] for g in groups] == [['cls_head.fc_cls.weight', 'cls_head.fc_cls.bias']]
    model.cls_head.requires_grad_(False)
    with pytest.raises(ValueError, match='no trainable parameters'): paper_param_groups(model)
    with pytest.raises(ValueError, match="'paper', 'clean' or 'plain'"): paper_param_groups(tiny_recognizer(), recipe='timm')


def test_groups_reach_adamw():
    "With zero gradients AdamW changes a parameter only through decoupled weight decay: bias tables stay, the rest shrink."
    model = tiny_recognizer()
    opt = torch.optim.AdamW(paper_param_groups(model), lr=3e-4, weight_decay=0.05)
    table = describe_param_groups(opt)
    assert len(table) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters(): p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        lr, wd = paper_rule(name)
        torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd), msg=name)


# --- the schedule ------------------------------------------------------------------------------------------------------

def simulate_mmcv(epochs, iters_per_epoch, warmup_epochs=2.5, warmup_ratio=0.1):
    "The lr factor of every iteration, replaying the hook's calls as an epoch-based runner makes them (state kept across calls)."
    warmup_iters, lr, out, it = warmup_epochs * iters_per_epoch, None, [], 0
    for epoch in range(epochs):
        regular = 0.5 * (math.cos(math.pi * epoch / epochs) + 1)
        lr = regular  # before_train_epoch
        for _ in range(iters_per_epoch):  # before_train_iter
            if warmup_epochs and it < warmup_iters: lr = regular * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))
            elif warmup_epochs and it == warmup_iters: lr = regular
            out.append(lr); it += 1
    return out


@pytest.mark.parametrize('epochs,iters_per_epoch,warmup_epochs', [(30, 1, 2.5), (30, 4, 2.5), (30, 5, 2.5), (30, 7, 2.5),
                                                                  (6, 3, 1), (10, 8, 0), (3, 9, 2.5)])
def test_schedule_replays_mmcv(epochs, iters_per_epoch, warmup_epochs):
    expected = simulate_mmcv(epochs, iters_per_epoch, warmup_epochs)
    got = [paper_lr_factor(i, epochs, iters_per_epoch, warmup_epochs) for i in range(epochs * iters_per_epoch)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def run_schedule(groups_lr, epochs, iters_per_epoch, **kw):
    params = [nn.Parameter(torch.zeros(1)) for _ in groups_lr]
    opt = torch.optim.AdamW([dict(params=[p], lr=lr) for p, lr in zip(params, groups_lr)], weight_decay=0.05)
    sched = paper_schedule(opt, epochs, iters_per_epoch, **kw)
    lrs = []
    for _ in range(epochs * iters_per_epoch):
        lrs.append([g['lr'] for g in opt.param_groups]); opt.step(); sched.step()
    return np.array(lrs), opt, sched


def test_schedule_hand_values():
    """30 epochs x 100 iterations, head lr 3e-4, computed by hand: mmcv's cosine to 0 stepped per epoch, times a linear
    warm-up over 2.5 epochs stepped per iteration from 0.1 (factor 1 - (1 - 0.1) * (1 - i / 250))."""
    lrs, _, _ = run_schedule([3e-4, 3e-5], 30, 100)
    head = lrs[:, 0]
    assert head[0] == pytest.approx(3e-5, rel=1e-12)
    assert head[125] == pytest.approx(3e-4 * (1 + math.cos(math.pi / 30)) / 2 * (1 - 0.5 * 0.9), rel=1e-12)
    assert head[249] == pytest.approx(2.95654e-4, abs=1e-9)
    assert head[250] == pytest.approx(2.96722e-4, abs=1e-9)
    assert head[1500] == pytest.approx(1.5e-4, rel=1e-12)
    assert head[2999] == pytest.approx(8.2172e-7, abs=1e-10)
    np.testing.assert_allclose(lrs[:, 1], head / 10, rtol=1e-12)  # every group is scaled by the same factor
    per_epoch = head[300:].reshape(27, 100)
    assert (per_epoch == per_epoch[:, :1]).all() and (np.diff(per_epoch[:, 0]) < 0).all()
    assert head.max() == pytest.approx(3e-4 * (1 + math.cos(2 * math.pi / 30)) / 2)


def test_schedule_resumes_from_state_dict():
    "A run stopped after 40 iterations and restored from the optimizer's and scheduler's state goes on with the same lrs."
    full, _, _ = run_schedule([3e-4], 30, 10)
    def fresh():
        opt = torch.optim.AdamW([dict(params=[nn.Parameter(torch.zeros(1))], lr=3e-4)])
        return opt, paper_schedule(opt, 30, 10)
    opt, sched = fresh()
    for _ in range(40): opt.step(); sched.step()
    opt2, sched2 = fresh()
    opt2.load_state_dict(opt.state_dict()); sched2.load_state_dict(sched.state_dict())
    lrs = []
    for _ in range(260): lrs.append(opt2.param_groups[0]['lr']); opt2.step(); sched2.step()
    np.testing.assert_allclose(lrs, full[40:, 0], rtol=1e-12)


def test_schedule_rejects_bad_arguments():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match='iters_per_epoch must be >= 1'): paper_schedule(opt, 30, 0)
    with pytest.raises(ValueError, match='warmup_ratio'): paper_schedule(opt, 30, 10, warmup_ratio=0)


# --- accumulation and seeding ------------------------------------------------------------------------------------------

def train_steps(update_interval, micro, scaler=None, max_grad_norm=None, seed=0):
    "Train a small classifier on 16 samples in micro-batches of `micro`; return its weights and the step pattern."
    torch.manual_seed(seed)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    acc = GradientAccumulator(torch.optim.AdamW(model.parameters(), lr=0.05), update_interval, scaler, max_grad_norm)
    stepped = [acc.backward(nn.functional.cross_entropy(model(x[i:i + micro]), y[i:i + micro])) for i in range(0, 16, micro)]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), stepped


def test_accumulation_equals_large_batch():
    big, stepped_big = train_steps(1, 8)
    small, stepped_small = train_steps(8, 1)
    assert stepped_big == [True, True] and stepped_small == ([False] * 7 + [True]) * 2
    torch.testing.assert_close(small, big, atol=1e-6, rtol=0)
    assert not torch.allclose(small, train_steps(1, 1)[0], atol=1e-4)  # without accumulation: another result


def test_accumulation_counts_across_epochs():
    "The step comes every update_interval micro-batches of the run, not of the epoch (mmcv's runner.iter)."
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    acc = GradientAccumulator(opt, update_interval=3)
    w = opt.param_groups[0]['params'][0]
    pattern = [[acc.backward((w * 1).sum()) for _ in range(4)] for _ in range(3)]  # 3 epochs of 4 micro-batches
    assert pattern == [[False, False, True, False], [False, True, False, False], [True, False, False, True]]


def test_accumulation_with_scaler_and_clipping():
    plain, _ = train_steps(4, 2)
    scaled, _ = train_steps(4, 2, scaler=torch.amp.GradScaler('cpu', init_scale=1024.))
    torch.testing.assert_close(scaled, plain, atol=1e-6, rtol=0)
    clipped, _ = train_steps(4, 2, max_grad_norm=1e-3)
    torch.testing.assert_close(train_steps(4, 2, scaler=torch.amp.GradScaler('cpu'), max_grad_norm=1e-3)[0], clipped, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match='update_interval must be >= 1'):
        GradientAccumulator(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), update_interval=0)


def test_clipping_bounds_the_step():
    "SGD with lr 1: one clipped step moves the weights by exactly the clipped gradient, of norm max_grad_norm."
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    acc = GradientAccumulator(torch.optim.SGD([w], lr=1.0), update_interval=2, max_grad_norm=0.5)
    acc.backward((w ** 2).sum() / 2); acc.backward((w ** 2).sum() / 2)  # mean gradient = w, norm 5
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) * (1 - 0.5 / 5))


def test_seed_everything_repeats_every_generator():
    def draw(): return random.random(), float(np.random.rand()), torch.rand(2).tolist(), torch.randn(1).item()
    assert seed_everything(7) == 7
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first
    loader = lambda: [b.tolist() for b in torch.utils.data.DataLoader(list(range(10)), batch_size=5, shuffle=True)]
    seed_everything(3); order = loader()
    seed_everything(3); assert loader() == order
