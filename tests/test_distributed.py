"""torchrun with 2 processes (gloo, CPU, float32): training takes the steps of one process with a micro-batch twice as
large (cached `uas`, stopped after epoch 1 and resumed; `lora`), evaluation counts every clip once, extraction makes the
cache one process makes, and a rank killed mid-extraction costs a rerun its missing shards only."""
import json, os, subprocess, sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dist_worker import recognizer, settings, train_and_evaluate
from uas.checkpoint import CheckpointError
from uas.cli import run_script, uas_extract
from uas.features import FeatureCache
from uas.synthetic import make_synthetic
from uas.train import Learner

HERE = Path(__file__).parent
CLASSES = ('sitting', 'walking', 'running')


def torchrun(*args, expect_failure=False):
    "Run `args` under torchrun in 2 processes on this machine; check how it ended."
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert (done.returncode != 0) == expect_failure, f'torchrun exited {done.returncode}:\n{done.stderr[-4000:]}'
    return done


@contextmanager
def one_thread():
    "Run torch on one thread, as each torchrun worker does, so that both sides round alike."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try: yield
    finally: torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def target(tmp_path_factory):
    "A synthetic target set of 3 behaviours: 5 training clips and 5 validation clips (8 frames of 32x32)."
    return make_synthetic(tmp_path_factory.mktemp('target'), 'target', seed=0, classes=CLASSES, class_weights=[1, 1, 1],
                          min_per_class=1, splits=dict(train=5, val=5, test=1), size=(32, 32), num_frames=8)


@pytest.fixture(scope='module')
def runs(target, tmp_path_factory):
    "The worker's training, evaluation and extraction: in 2 processes of micro-batch 1, and alone with micro-batch 2."
    two, one = tmp_path_factory.mktemp('two'), tmp_path_factory.mktemp('one')
    torchrun(HERE/'dist_worker.py', 'train', target['root'], target['lists']['train'], target['lists']['val'], two)
    with one_thread(): train_and_evaluate(target['root'], target['lists'], one, micro_batch=2)
    return two, one


def weights(run_folder): return torch.load(run_folder/'epoch_2.pth', weights_only=True)['state_dict']


@pytest.mark.parametrize('mode', ['uas', 'lora'])
def test_two_processes_take_the_steps_of_one_with_twice_the_micro_batch(runs, mode):
    two, one = (folder/mode for folder in runs)
    trained, reference = weights(two), weights(one)
    assert trained.keys() == reference.keys()
    for name, w in reference.items():  # relative to each tensor's norm: LoRA's B starts at 0 and its few steps are tiny
        assert (trained[name] - w).norm() <= 1e-5 * w.norm(), name
    changed = recognizer(mode).state_dict()
    assert any(not torch.equal(w, changed[name]) for name, w in reference.items())  # 3 steps moved the weights
    log = [json.loads(line) for line in (two/'log.jsonl').read_text().splitlines()]
    starts = [e for e in log if e['event'] == 'start']
    assert [e['world_size'] for e in starts] == [2] and json.loads((two/'record.json').read_text())['world_size'] == 2
    assert [(e['epoch'], e['clips'], e['rank_clips']) for e in log if e['event'] == 'epoch'] == [(1, 5, [3, 2]), (2, 5, [3, 2])]
    steps = torch.load(two/'epoch_2.pth', weights_only=True)['training']['optimizer']['state']
    assert {int(s['step']) for s in steps.values()} == {3}


def test_the_cached_run_resumed_under_torchrun_held_each_ranks_unfinished_gradient(runs):
    "Epoch 1 (3 micro-batches, a step every 2) ended mid-step: each rank's own gradient went into the checkpoint."
    two, _ = runs
    state = torch.load(two/'uas'/'epoch_1.pth', weights_only=True)['training']
    assert state['world_size'] == 2 and len(state['ranks']) == 2
    grads = [rank['grads']['cls_head.fc_cls.weight'] for rank in state['ranks']]
    assert not torch.equal(grads[0], grads[1])
    assert [e['event'] for e in map(json.loads, (two/'uas'/'log.jsonl').read_text().splitlines())].count('resume') == 1


def test_resuming_with_another_number_of_processes_is_refused(runs, target):
    two, _ = runs
    caches = [FeatureCache(two/f'{split}_cache') for split in ('train', 'val')]
    learn = Learner(recognizer('uas'), replace(settings('uas', 1), cached=True), *caches, progress=False)
    with pytest.raises(CheckpointError, match='world size: the checkpoint was trained by 2 processes, this run has 1'):
        learn.fit(resume=two/'uas'/'epoch_1.pth')


def test_two_process_evaluation_of_an_odd_count_gives_the_one_process_metrics(runs):
    two, one = (torch.load(folder/'evaluation.pt', weights_only=True) for folder in runs)
    assert two['indices'].tolist() == one['indices'].tolist() == list(range(5))
    assert two['metrics'] == one['metrics']
    torch.testing.assert_close(two['scores'], one['scores'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_two_process_extraction_makes_the_one_process_cache(runs, split):
    two, one = (FeatureCache(folder/f'{split}_cache') for folder in runs)
    assert two.manifest == one.manifest and two.complete and two.num_shards == 3
    assert two.indices.tolist() == one.indices.tolist() == list(range(5)) and torch.equal(two.labels, one.labels)
    assert two.features.dtype == torch.float32 and (two.features - one.features).abs().max() <= 1e-6


def test_a_rank_killed_mid_extraction_costs_the_rerun_its_missing_shards_only(target, tmp_path):
    data = [f'data.train.{k}={v}' for k, v in (('ann_file', target['lists']['train']), ('data_prefix', target['root']),
                                               ('clip_len', 4), ('short_side', 32), ('crop_size', 32))]
    args = ['synthetic_mini', '--shard-size', '1', '--no-progress', '--cfg-options', 'data.workers_per_gpu=0', *data]
    out = tmp_path/'cache'
    torchrun(HERE/'dist_worker.py', 'extract_dying', *args, '--out', out, expect_failure=True)
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob('shard_*.pt')}
    assert 'shard_00001.pt' in done and 'shard_00003.pt' not in done  # rank 1's first shard, not its second
    torchrun(Path(sys.executable).parent/'uas_extract', *args, '--out', out)
    cache = FeatureCache(out)
    assert cache.complete and not list(out.glob('*.tmp'))
    assert {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name in done for p in [out/name]} == done  # not recomputed
    with one_thread(): assert run_script(uas_extract, 'uas_extract', [*args, '--out', str(tmp_path/'alone')]) == 0
    alone = FeatureCache(tmp_path/'alone')
    assert cache.manifest == alone.manifest and cache.indices.tolist() == alone.indices.tolist() == list(range(5))
    torch.testing.assert_close(cache.features, alone.features, rtol=0, atol=1e-3)
