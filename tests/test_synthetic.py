"Tests of uas.synthetic: reproducible sets, class counts, read-back through uas.video, and that motion carries the labels."
import json
from pathlib import Path

import numpy as np
import pytest

from uas.synthetic import (CHIMPBEHAVE_TRAIN_COUNTS, DEFAULT_SPLITS, GENERATOR_VERSION, SOURCE_ACTIONS, TARGET_BEHAVIOURS,
                           make_synthetic, render_target, split_counts)
from uas.video import open_video

TINY = dict(size=(32, 32), num_frames=8)


def read_list(path):
    return [(rel, int(label)) for rel, label in (line.split() for line in Path(path).read_text().splitlines())]


def decode(path):
    with open_video(path) as video: return video.get_frames(range(len(video)))


@pytest.fixture(scope='module')
def tiny_sets(tmp_path_factory):
    "Two target sets with seed 0 and one with seed 1, each with 8 clips per class and split."
    root = tmp_path_factory.mktemp('synthetic')
    splits = dict(train=56, val=10, test=10)
    return root, {name: make_synthetic(root / name, 'target', seed=seed, splits=splits, **TINY)
                  for name, seed in (('a', 0), ('b', 0), ('c', 1))}


def test_same_seed_same_lists_and_files(tiny_sets):
    root, sets = tiny_sets
    for split in ('train', 'val', 'test'):
        a, b = (Path(sets[k]['lists'][split]).read_text() for k in 'ab')
        assert a == b and a.count('\n') >= 7 * 8
        for rel, _ in read_list(sets['a']['lists'][split]):
            assert (root / 'a' / rel).read_bytes() == (root / 'b' / rel).read_bytes()
            np.testing.assert_array_equal(decode(root / 'a' / rel), decode(root / 'b' / rel))


def test_other_seed_other_clips(tiny_sets):
    root, sets = tiny_sets
    entries = read_list(sets['a']['lists']['train'])
    assert entries == read_list(sets['c']['lists']['train'])
    for rel, _ in entries:
        assert not np.array_equal(decode(root / 'a' / rel), decode(root / 'c' / rel)), rel


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
    w = np.array(weights, float) / sum(weights)
    for total in totals:
        counts = np.array(split_counts(weights, total))
        share = w * total
        assert (counts >= 8).all()
        assert ((np.abs(counts - share) <= 1) | ((counts == 8) & (share < 8))).all(), (total, counts, share)


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


@pytest.mark.slow
@pytest.mark.parametrize('difficulty, seed', [('hard', 1)])
def test_motion_not_a_single_frame_tells_climbing_up_from_down(tmp_path, difficulty, seed):
    "5-fold CV of logistic regression: chance from the middle frame, high from a frame difference."
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    s = make_synthetic(tmp_path, 'target', seed, classes=('climbing_up', 'climbing_down'), class_weights=(1, 1),
                       splits=dict(train=160, val=24, test=24), size=(32, 32), num_frames=16, difficulty=difficulty)
    entries = [e for path in s['lists'].values() for e in read_list(path)]
    labels = np.array([label for _, label in entries])
    assert np.bincount(labels).tolist() == [104, 104]
    clips = np.stack([decode(tmp_path / rel) for rel, _ in entries]).astype(np.float32) / 255
    grey = lambda f: f.mean(-1).reshape(len(f), 16, 2, 16, 2).mean((2, 4)).reshape(len(f), -1)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    accuracy = lambda X: cross_val_score(LogisticRegression(max_iter=2000), X, labels, cv=folds).mean()
    assert accuracy(grey(clips[:, 8])) <= .6
    assert accuracy(grey(clips[:, 12]) - grey(clips[:, 4])) >= .8


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
