"""The training engine: each mode trains what it should with the paper's recipe in bfloat16; a run killed (SIGKILL,
also between writing a checkpoint and renaming it) or interrupted (SIGINT) resumes to the bit-identical end of an
uninterrupted run, each in a process of its own."""
import json, math, subprocess, sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from helpers import paper_rule
from train_worker import datasets, settings
from uas.features import extract_features
from uas.model import build_recognizer
from uas.synthetic import make_synthetic
from uas.train import Learner, seed_everything
from uas.viz import plot_training_curves

WORKER = Path(__file__).parent/'train_worker.py'
CLASSES = ('sitting', 'walking', 'running')


@pytest.fixture(scope='module')
def target(tmp_path_factory):
    "A synthetic target set of 3 behaviours: 6 training clips, 3 validation clips (8 frames of 32x32)."
    root = tmp_path_factory.mktemp('target')
    return make_synthetic(root, 'target', seed=0, classes=CLASSES, class_weights=[1, 1, 1], min_per_class=1,
                          splits=dict(train=6, val=3, test=3), size=(32, 32), num_frames=8)


@pytest.mark.parametrize('mode, cached', [('uas', False), ('uas', True), ('lora', False), ('full', False)])
def test_each_mode_trains_exactly_its_parameters_with_the_paper_recipe_in_bf16(target, tmp_path, mode, cached):
    train, val = datasets(target['root'], target['lists'])
    seed_everything(0)
    model = build_recognizer('swin3d_mini', 3, mode=mode, lora_rank=4)
    if cached: train, val = (extract_features(model.backbone, d, tmp_path/name, progress=False) for d, name in ((train, 'train'), (val, 'val')))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtypes = []
    model.cls_head.fc_cls.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype) if m.training else None)
    learn = Learner(model, replace(settings(mode, epochs=2), amp='bf16', cached=cached), train, val, progress=False)
    history = learn.fit()
    assert len(history) == 2 and all(math.isfinite(h['loss']) for h in history)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the training forward passes ran in bfloat16
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and any(n.startswith('backbone.') for n in trainable) == (mode != 'uas')
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable  # every trainable tensor changed; every frozen one (buffers too) is bit-for-bit unchanged
    recipe = {n: (g['initial_lr'], g['weight_decay']) for g in learn.optimizer.param_groups for n in g['param_names']}
    assert recipe.keys() == trainable
    for name, (lr, decay) in recipe.items(): assert (lr, decay) == pytest.approx(paper_rule(name), rel=1e-12), name


def test_class_balancing_weighs_the_loss_as_scikit_learn_and_draws_classes_equally(tmp_path):
    "Off by default (the paper uses neither); on, for a set where one class has most clips, as ChimpBehave's sitting."
    skewed = make_synthetic(tmp_path/'skewed', 'target', seed=1, classes=CLASSES, class_weights=[8, 1, 1], min_per_class=1,
                            splits=dict(train=12, val=3, test=3), size=(32, 32), num_frames=8)
    train, _ = datasets(skewed['root'], skewed['lists'])
    labels = np.array([e.label for e in train.annotations])
    assert np.bincount(labels).tolist() == [10, 1, 1]
    seed_everything(0)
    model = build_recognizer('swin3d_mini', 3, mode='uas')
    cache = extract_features(model.backbone, train, tmp_path/'cache', progress=False)
    plain = Learner(model, replace(settings('uas', epochs=1), cached=True), cache, progress=False)
    assert plain.loss_weights is None and plain.batches.sampler.p is None
    balanced = replace(settings('uas', epochs=1), cached=True, class_weighted_loss=True, class_balanced_sampler=True)
    learn = Learner(model, balanced, cache, progress=False)
    reference = compute_class_weight('balanced', classes=np.arange(3), y=labels)
    np.testing.assert_allclose(learn.loss_weights.numpy(), reference, rtol=1e-6)
    drawn = []
    for epoch in range(100):
        learn.batches.set_epoch(epoch)
        drawn += [label for batch in learn.batches for label in batch['label'].tolist()]
    np.testing.assert_allclose(np.bincount(drawn) / len(drawn), [1 / 3] * 3, atol=0.03)
    assert math.isfinite(learn.fit()[0]['loss'])
    one_clip = Learner(model, replace(balanced, batch_size=2), cache, progress=False)
    rare = next(batch for batch in one_clip.batches if batch['label'].item() != 0)
    one_clip.batch = rare
    one_clip.one_batch()
    unweighted = torch.nn.functional.cross_entropy(one_clip.preds.float(), rare['label'])
    torch.testing.assert_close(one_clip.loss, unweighted * reference[rare['label'].item()])  # a micro-batch of one keeps its weight


def run(*args, expect=0):
    "Run the worker in a fresh process; check its exit status."
    done = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, f'worker exited {done.returncode}, expected {expect}:\n{done.stderr[-3000:]}'
    return done


def final_state(work_dir):
    "The last epoch's checkpoint (weights, optimizer state) and the record's metrics of a run folder."
    ckpt = torch.load(work_dir/'epoch_4.pth', weights_only=True)
    return ckpt, json.loads((work_dir/'record.json').read_text())['metrics']


def assert_identical(a, b, where='checkpoint'):
    "Equal, bit for bit: nested dicts, lists and tensors."
    if isinstance(a, torch.Tensor): assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a: assert_identical(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): assert_identical(x, y, f'{where}[{i}]')
    else: assert a == b, where


def events(work_dir): return [json.loads(line) for line in (work_dir/'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def uninterrupted(target, tmp_path_factory):
    "The end of an uninterrupted 4-epoch run of each mode, each in a process of its own."
    out = {}
    for mode in ('uas', 'lora'):
        work = tmp_path_factory.mktemp(f'whole_{mode}')
        run(target['root'], work, '--mode', mode)
        out[mode] = final_state(work)
    return out


def assert_same_end(work_dir, reference):
    (ckpt, metrics), (ref_ckpt, ref_metrics) = final_state(work_dir), reference
    assert_identical(ckpt['state_dict'], ref_ckpt['state_dict'], 'weights')
    assert_identical(ckpt['training']['optimizer'], ref_ckpt['training']['optimizer'], 'optimizer')
    assert_identical(ckpt['training']['random']['torch'], ref_ckpt['training']['random']['torch'], 'torch random state')
    assert metrics == ref_metrics and metrics['top1_acc'] is not None


@pytest.mark.parametrize('mode', ['uas', 'lora'])
def test_a_run_killed_in_epoch_3_resumes_to_the_same_end(target, tmp_path, uninterrupted, mode):
    # 6 clips in micro-batches of 2: 3 iterations an epoch, so iteration 8 is in epoch 3
    run(target['root'], tmp_path, '--mode', mode, '--kill_at', 8, expect=-9)
    assert torch.load(tmp_path/'latest.pth', weights_only=True)['training']['epoch'] == 2
    run(target['root'], tmp_path, '--mode', mode, '--resume')
    assert_same_end(tmp_path, uninterrupted[mode])
    log = events(tmp_path)
    resumed = next(i for i, e in enumerate(log) if e['event'] == 'resume')
    assert log[resumed]['epoch'] == 2 and log[resumed]['position'] == 0
    trained = [e['epoch'] for e in log[resumed:] if e['event'] == 'epoch']
    assert trained == [3, 4]  # epochs 1-2 were not trained again
    assert [e['epoch'] for e in log if e['event'] == 'epoch'] == [1, 2, 3, 4]
    loss_panel = plot_training_curves(tmp_path).axes[0]
    assert list(loss_panel.lines[1].get_xdata()) == [1, 2, 3, 4]  # the epoch means, the killed epoch once


def test_a_kill_between_writing_and_renaming_a_checkpoint_leaves_the_previous_one(target, tmp_path, uninterrupted):
    run(target['root'], tmp_path, '--kill_renaming', 'epoch_2.pth', expect=-9)
    assert not (tmp_path/'epoch_2.pth').exists() and (tmp_path/'.epoch_2.pth.tmp').exists()
    latest = torch.load(tmp_path/'latest.pth', weights_only=True)
    assert latest['training']['epoch'] == 1 and latest['uas_model']['mode'] == 'uas'
    run(target['root'], tmp_path, '--resume')
    assert_same_end(tmp_path, uninterrupted['uas'])


def test_ctrl_c_saves_a_checkpoint_mid_epoch_that_resumes_to_the_same_end(target, tmp_path, uninterrupted):
    # iteration 7 is the first of epoch 3 and the first of an accumulation window of 2: its gradient must be kept
    done = run(target['root'], tmp_path, '--sigint_at', 7, expect=130)
    assert 'stopped by Ctrl-C in epoch 3, iteration 7' in done.stderr
    state = torch.load(tmp_path/'latest.pth', weights_only=True)['training']
    assert (state['epoch'], state['position'], state['iter']) == (2, 1, 7) and state['grads']
    assert events(tmp_path)[-1]['event'] == 'interrupt'
    run(target['root'], tmp_path, '--resume')
    assert_same_end(tmp_path, uninterrupted['uas'])
