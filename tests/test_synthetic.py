"Tests of uas.synthetic: reproducible sets, class counts, read-back through uas.video, and look-alike behaviours that differ only in motion (that the motion carries the labels is measured in 01b_synthetic)."
import hashlib, json, multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from helpers import counts_follow_weights, decode_all, read_list
from uas.synthetic import (CHIMPBEHAVE_TRAIN_COUNTS, DEFAULT_SPLITS, GENERATOR_VERSION, SOURCE_ACTIONS, TARGET_BEHAVIOURS,
                           clip_rng, make_synthetic, render_target, split_counts, write_clip)
from uas.video import open_video

TINY = dict(size=(32, 32), num_frames=8)


@pytest.fixture(scope='module')
def tiny_sets(tmp_path_factory):
    "Two target sets with seed 0 and one with seed 1, each with 8 clips per class and split."
    root = tmp_path_factory.mktemp('synthetic')
    splits = dict(train=56, val=10, test=10)
    return root, {name: make_synthetic(root / name, 'target', seed=seed, splits=splits, **TINY)
                  for name, seed in (('a', 0), ('b', 0), ('c', 1))}


def digests(folder):
    "SHA-256 of every file under `folder` by relative path, leaving out `synthetic.json` (it names the folder)."
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(folder).rglob('*') if p.is_file() and p.name != 'synthetic.json'}


def test_same_seed_same_tree(tiny_sets):
    "Two folders made with the same seed hold the same files, byte for byte: lists, classes and every clip."
    root, sets = tiny_sets
    a, b = digests(root / 'a'), digests(root / 'b')
    assert a == b and len(a) == 3 + 1 + sum(sum(c.values()) for c in sets['a']['counts'].values())
    paths = ('root', 'lists', 'classes_file')
    settings = [{k: v for k, v in sets[name].items() if k not in paths} for name in 'ab']
    assert settings[0] == settings[1]


def write_in_step(start, frames, path, results):
    "In a fresh process: wait until all are ready, write `frames` with `write_clip`, report the file's SHA-256."
    start.wait(timeout=120)
    results.put(hashlib.sha256(write_clip(path, frames).read_bytes()).hexdigest())


def test_four_processes_at_once_write_one_file(tmp_path):
    """Four new processes encode the same frames at the same moment: one SHA-256, the one this process gets.
    They are forked from a fresh server process that imported `uas.synthetic` once (spawning four would import
    torch four times, 10 s on two cores), and they start together at a barrier."""
    frames = render_target('running', clip_rng(0, 'running'), (32, 32), 8)
    ctx = mp.get_context('forkserver')
    ctx.set_forkserver_preload(['uas.synthetic'])
    start, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=write_in_step, args=(start, frames, tmp_path / f'{i}.mp4', results), daemon=True)
               for i in range(4)]
    for w in workers: w.start()
    try: found = [results.get(timeout=120) for _ in workers]
    finally:  # a worker that died early must not leave the others waiting at the barrier, nor pytest at exit
        for w in workers: w.join(30)
        for w in workers:
            if w.is_alive(): w.terminate()
    assert [w.exitcode for w in workers] == [0] * 4
    assert set(found) == {hashlib.sha256(write_clip(tmp_path / 'here.mp4', frames).read_bytes()).hexdigest()}


def test_other_seed_other_clips(tiny_sets):
    root, sets = tiny_sets
    entries = read_list(sets['a']['lists']['train'])
    assert entries == read_list(sets['c']['lists']['train'])
    for rel, _ in entries:
        assert not np.array_equal(decode_all(root / 'a' / rel), decode_all(root / 'c' / rel)), rel


def test_every_file_reads_back(tiny_sets):
    root, sets = tiny_sets
    s = sets['a']
    assert Path(s['classes_file']).read_text().split() == list(TARGET_BEHAVIOURS)
    assert s['generator_version'] == GENERATOR_VERSION
    assert json.loads((root / 'a' / 'synthetic.json').read_text()) == s
    for split in ('train', 'val', 'test'):
        entries = read_list(s['lists'][split])
        assert np.bincount([label for _, label in entries]).tolist() == list(s['counts'][split].values())
        for rel, label in entries:
            assert rel.startswith(f'{split}/{TARGET_BEHAVIOURS[label]}/')
            with open_video(root / 'a' / rel) as video:
                assert (len(video), video.height, video.width, round(video.fps)) == (8, 32, 32, 16)


def test_clip_does_not_depend_on_the_rest_of_the_set(tmp_path, tiny_sets):
    "A clip is fixed by seed and name: a set of one class holds the same files as the full set."
    root, sets = tiny_sets
    s = make_synthetic(tmp_path, 'target', seed=0, classes=('running',), splits=dict(train=8, val=8, test=8), **TINY)
    assert s['classes'] == ['running'] and read_list(s['lists']['train'])[0] == ('train/running/running_0000.mp4', 0)
    for i in range(8):
        rel = f'train/running/running_{i:04d}.mp4'
        assert (tmp_path / rel).read_bytes() == (root / 'a' / rel).read_bytes()


@pytest.mark.parametrize('weights, totals', [(CHIMPBEHAVE_TRAIN_COUNTS, (96, 48, 500, 3000)),
                                             ((5, 1, 1), (10, 30, 31, 1000)), ((1,) * 12, (12, 100, 192))])
def test_counts_follow_class_weights(weights, totals):
    for total in totals:
        counts = split_counts(weights, total)
        assert min(counts) >= 8 and counts_follow_weights(counts, weights, total), (total, counts)


def test_default_summaries_follow_chimpbehave(tmp_path):
    s = make_synthetic(tmp_path, 'target', size=(16, 16), num_frames=2, difficulty='easy')
    assert s['class_weights'] == [float(c) for c in CHIMPBEHAVE_TRAIN_COUNTS]
    assert list(s['counts']['train'].values()) == [74, 10, 10, 8, 8, 8, 8]
    assert all(min(c.values()) >= 8 for c in s['counts'].values())
    assert set(s['counts']) == set(DEFAULT_SPLITS['target'])


def test_a_set_that_exists_is_reused_and_a_changed_one_rewritten(tmp_path):
    kw = dict(splits=dict(train=12, val=12, test=12), min_per_class=1, **TINY)
    s = make_synthetic(tmp_path, 'source', **kw)
    clip = tmp_path / 'train/orbit/orbit_0000.mp4'
    before = clip.read_bytes()
    clip.write_bytes(b'left alone')
    assert make_synthetic(tmp_path, 'source', **kw) == s
    assert clip.read_bytes() == b'left alone'  # reused, not rendered again
    t = make_synthetic(tmp_path, 'source', seed=0, **{**kw, 'difficulty': 'hard'})
    assert t['difficulty']['noise'] == 8 and clip.read_bytes() != before and clip.read_bytes() != b'left alone'
    assert read_list(t['lists']['train'])[-1] == ('train/orbit/orbit_0000.mp4', SOURCE_ACTIONS.index('orbit'))


@pytest.mark.parametrize('kw, message', [(dict(kind='animals'), 'kind must be one of'),
                                         (dict(kind='target', classes=['sleeping']), "'sleeping'"),
                                         (dict(kind='source', classes=['orbit', 'orbit']), 'distinct'),
                                         (dict(kind='target', class_weights=[1, 2]), '2 class weights for 7 classes'),
                                         (dict(kind='target', class_weights=[0] * 7), 'positive sum'),
                                         (dict(kind='source', size=(32, 31)), 'even'),
                                         (dict(kind='source', difficulty='brutal'), "unknown difficulty 'brutal'")])
def test_bad_arguments_say_what_is_wrong(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('[', r'\[')):
        make_synthetic(tmp_path, **{'splits': dict(train=1), 'min_per_class': 1, **TINY, **kw})


@pytest.mark.parametrize('pair', [('climbing_up', 'climbing_down'), ('walking', 'running')])
@pytest.mark.parametrize('difficulty', ['default', 'hard'])
def test_look_alike_pairs_differ_only_in_motion(pair, difficulty):
    "From the same generator the two behaviours draw the same animal, scene and noise: the middle frame is identical, the clips are not."
    for seed in range(2):
        a, b = (render_target(name, np.random.default_rng(seed), difficulty=difficulty) for name in pair)
        np.testing.assert_array_equal(a[16], b[16])
        assert not np.array_equal(a, b)


def test_sets_load_through_uas_data(tiny_sets):
    "The lists and classes file are what uas.data reads; a clip comes out of a VideoDataset with its label."
    from uas.data import VideoDataset, read_annotations
    from uas.video import val_pipeline
    root, sets = tiny_sets
    s = sets['a']
    annotations = read_annotations(s['lists']['val'], classes=s['classes_file'])
    assert annotations.classes == list(TARGET_BEHAVIOURS) and len(annotations) == sum(s['counts']['val'].values())
    dataset = VideoDataset(annotations, root / 'a', val_pipeline(clip_len=8, frame_interval=1, short_side=32, crop_size=32))
    item = dataset[len(dataset) - 1]
    assert item['label'] == TARGET_BEHAVIOURS.index('running') and tuple(item['clip'].shape) == (1, 3, 8, 32, 32)
