"Feature cache: identity checks, resumable extraction counted in backbone calls, atomic shards, failures reported."
import json, warnings

import pytest
import torch

from helpers import write_clip_list
import pandas as pd
from uas.backbone import swin3d_mini
from uas.data import ClipError, VideoDataset
from uas.features import CacheMismatchError, FeatureCache, cache_identity, extract_features, weights_hash
from uas.video import VideoReadError, get_pipeline


class Clips(torch.utils.data.Dataset):
    "`n` random clips `[1, 3, 8, 32, 32]` labelled `i % 3`; reading an index in `broken` fails as a bad file would."
    def __init__(self, n, broken=()): self.n, self.broken = n, set(broken)
    def __len__(self): return self.n
    def __getitem__(self, i):
        if i in self.broken: raise VideoReadError(f'clip_{i}.mp4', 'invalid data found when processing input')
        return {'clip': torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(i)), 'label': i % 3, 'index': i}


@pytest.fixture(scope='module')
def backbone():
    torch.manual_seed(0)
    return swin3d_mini()


def count_calls(module):
    "A list that grows by the batch size of every forward call of `module`, and the hook handle."
    calls = []
    return calls, module.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))


def test_killed_run_resumes_without_recomputing_finished_shards(backbone, tmp_path):
    calls, hook = count_calls(backbone)
    class Killed(Exception): pass
    def die(m, args, out):
        if len(calls) >= 5: raise Killed
    killer = backbone.register_forward_hook(die)
    try:
        with pytest.raises(Killed):
            extract_features(backbone, Clips(11), tmp_path, pipeline='p', shard_size=3, batch_size=1, progress=False)
    finally: killer.remove()
    (tmp_path/'shard_00001.pt.tmp').write_bytes(b'half a shard')  # a kill in the middle of a write
    assert FeatureCache(tmp_path).done() == [0]                     # 5 calls: shard 0 (3 clips) done, shard 1 lost
    calls.clear()
    cache = extract_features(backbone, Clips(11), tmp_path, pipeline='p', shard_size=3, batch_size=1, progress=False)
    hook.remove()
    assert sum(calls) == 11 - 3 and cache.complete and not list(tmp_path.glob('*.tmp'))
    assert cache.indices.tolist() == list(range(11))
    fresh = extract_features(backbone, Clips(11), tmp_path/'fresh', pipeline='p', shard_size=3, batch_size=1, progress=False)
    assert torch.equal(cache.features, fresh.features)


def test_finished_cache_is_not_recomputed(backbone, tmp_path):
    extract_features(backbone, Clips(4), tmp_path, pipeline='p', progress=False)
    calls, hook = count_calls(backbone)
    cache = extract_features(backbone, Clips(4), tmp_path, pipeline='p', progress=False)
    hook.remove()
    assert calls == [] and len(cache) == 4


def test_other_backbone_weights_or_pipeline_raise(backbone, tmp_path):
    extract_features(backbone, Clips(3), tmp_path, pipeline='decode 8x32x32', arch='swin3d_mini', progress=False)
    other = swin3d_mini()
    other.load_state_dict(backbone.state_dict())
    with torch.no_grad(): other.layers[0].blocks[0].attn.qkv.weight[0, 0] += 1e-4
    with pytest.raises(CacheMismatchError, match='another weights'):
        extract_features(other, Clips(3), tmp_path, pipeline='decode 8x32x32', arch='swin3d_mini', progress=False)
    with pytest.raises(CacheMismatchError, match='another pipeline'):
        extract_features(backbone, Clips(3), tmp_path, pipeline='decode 8x48x48', arch='swin3d_mini', progress=False)
    with pytest.raises(CacheMismatchError, match='another arch'):
        extract_features(backbone, Clips(3), tmp_path, pipeline='decode 8x32x32', arch='swin3d_t', progress=False)
    with pytest.raises(CacheMismatchError, match='another aug_views'):
        extract_features(backbone, Clips(3), tmp_path, pipeline='decode 8x32x32', arch='swin3d_mini', aug_views=2, progress=False)
    with pytest.raises(CacheMismatchError, match='another autocast'):
        extract_features(backbone, Clips(3), tmp_path, pipeline='decode 8x32x32', arch='swin3d_mini', amp=True, progress=False)
    with pytest.raises(CacheMismatchError, match='3 clips'):
        extract_features(backbone, Clips(3), tmp_path, pipeline='decode 8x32x32', arch='swin3d_mini', shard_size=2, progress=False)
    with pytest.raises(CacheMismatchError, match='another weights'):
        FeatureCache(tmp_path, expect=cache_identity(other, 'decode 8x32x32', Clips(3), arch='swin3d_mini'))
    assert len(FeatureCache(tmp_path, expect=cache_identity(backbone, 'decode 8x32x32', Clips(3), arch='swin3d_mini'))) == 3


def test_weights_hash_sees_buffers_and_dtype(backbone):
    copy = swin3d_mini()
    copy.load_state_dict(backbone.state_dict())
    assert weights_hash(copy) == weights_hash(backbone) == weights_hash(backbone.state_dict())
    copy.register_buffer('scale', torch.zeros(3))                   # our Swin has no buffer of its own: add one
    zeros = weights_hash(copy)
    assert zeros != weights_hash(backbone)
    copy.scale[1] = 1.
    assert weights_hash(copy) != zeros                              # the buffer's value counts
    copy.scale = torch.zeros(3, dtype=torch.int32)                   # the same 12 zero bytes, another dtype
    assert weights_hash(copy) != zeros
    copy.scale = torch.zeros(3)
    assert weights_hash(copy) == zeros


def test_broken_clips_are_reported_and_kept_out(backbone, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        cache = extract_features(backbone, Clips(7, broken={0, 5}), tmp_path, pipeline='p', shard_size=3, progress=False)
    assert cache.indices.tolist() == [1, 2, 3, 4, 6] and len(cache.features) == 5
    assert [(f['index'], f['error']) for f in cache.failures] == [
        (0, "item 0: clip 'clip_0.mp4' is unreadable: invalid data found when processing input"),
        (5, "item 5: clip 'clip_5.mp4' is unreadable: invalid data found when processing input")]
    message = ' '.join(str(w.message) for w in caught)
    assert '2 of 7 clips failed' in message and 'clip_5.mp4' in message
    shard = torch.load(tmp_path/'shard_00001.pt', weights_only=True)   # failures live in the shard of their range
    assert [f['index'] for f in shard['failures']] == [5]


def test_shard_of_only_broken_clips(backbone, tmp_path):
    with pytest.warns(UserWarning, match='2 of 4 clips failed'):
        cache = extract_features(backbone, Clips(4, broken={2, 3}), tmp_path, pipeline='p', shard_size=2, progress=False)
    assert cache.indices.tolist() == [0, 1] and cache.features.shape == (2, 1, backbone.num_features)


def test_float32_cache_equals_the_backbone(backbone, tmp_path):
    cache = extract_features(backbone, Clips(2), tmp_path, pipeline='p', dtype='float32', progress=False)
    backbone.eval()
    with torch.no_grad(): direct = backbone(torch.cat([Clips(2)[i]['clip'] for i in range(2)])).mean((2, 3, 4))
    assert cache.features.dtype == torch.float32
    torch.testing.assert_close(cache.features[:, 0], direct, atol=1e-5, rtol=1e-5)
    half = extract_features(backbone, Clips(2), tmp_path/'half', pipeline='p', progress=False)
    assert half.features.dtype == torch.float16
    torch.testing.assert_close(half.features.float(), cache.features, atol=1e-2, rtol=1e-2)
    assert json.loads((tmp_path/'manifest.json').read_text())['identity']['dtype'] == 'float32'


def test_extraction_leaves_the_backbone_mode_as_it_was(backbone, tmp_path):
    backbone.train()
    extract_features(backbone, Clips(2), tmp_path, pipeline='p', progress=False)
    assert backbone.training
    backbone.eval()


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='manifest.json'): FeatureCache(tmp_path)


# Real files through `uas.data.VideoDataset` and `uas.video` pipelines.

@pytest.fixture(scope='module')
def video_list(tmp_path_factory):
    "Six 8-frame 32x32 mp4 clips of two classes listed in `train.txt`, the fourth of them a truncated file."
    root = tmp_path_factory.mktemp('videos')
    write_clip_list(root, 6, 2)
    (root/'clip 3.mp4').write_bytes((root/'clip 3.mp4').read_bytes()[:200])
    return root/'train.txt'


def small(stage): return get_pipeline(f'chimpbehave_{stage}', clip_len=4, short_side=32, crop_size=32)


def test_broken_video_file_reported_by_name_in_the_cache_and_the_skip_report(backbone, video_list, tmp_path):
    data = VideoDataset(video_list, pipeline=small('val'), on_error='skip')
    with pytest.warns(UserWarning, match='1 of 6 clips failed'):
        cache = extract_features(backbone, data, tmp_path, progress=False)
    assert cache.indices.tolist() == [0, 1, 2, 4, 5] and cache.labels.tolist() == [0, 1, 0, 0, 1]
    (failure,) = cache.failures
    assert failure['index'] == 3 and 'train.txt:4' in failure['error'] and 'clip 3.mp4' in failure['error']
    report = pd.read_csv(tmp_path/'skipped_train.csv')  # no work_dir: the report goes with the cache
    assert report[['path', 'where', 'status', 'index']].values.tolist() == [['clip 3.mp4', f'{video_list}:4', 'unreadable', 3]]
    work = VideoDataset(video_list, pipeline=small('val'), on_error='skip', work_dir=tmp_path/'work')
    with pytest.warns(UserWarning, match='1 of 6 clips failed'): extract_features(backbone, work, tmp_path, progress=False)
    assert pd.read_csv(tmp_path/'work'/'skipped_train.csv').path.tolist() == ['clip 3.mp4']


def test_on_error_raise_stops_extraction_at_the_bad_clip(backbone, video_list, tmp_path):
    data = VideoDataset(video_list, pipeline=small('val'), on_error='raise')
    with pytest.raises(ClipError, match=r"train.txt:4: clip 'clip 3.mp4' is unreadable"):
        extract_features(backbone, data, tmp_path, shard_size=2, progress=False)
    assert FeatureCache(tmp_path).done() == [0] and not FeatureCache(tmp_path).complete


def test_a_configuration_mistake_stops_extraction_and_marks_nothing_done(backbone, video_list, tmp_path):
    "A crop larger than the frames is not a bad clip: its own error stops the run, whatever `on_error` says."
    too_big = get_pipeline('chimpbehave_val', clip_len=4, short_side=32, crop_size=96)
    data = VideoDataset(video_list, pipeline=too_big, on_error='skip')
    with pytest.raises(Exception) as caught: too_big(video_list.parent/'clip 0.mp4')
    for workers in (0, 1):
        with pytest.raises(type(caught.value), match='96'):
            extract_features(backbone, data, tmp_path/str(workers), num_workers=workers, progress=False)
        assert FeatureCache(tmp_path/str(workers)).done() == [] and not FeatureCache(tmp_path/str(workers)).complete


def test_a_rerun_computes_the_clip_that_failed_and_nothing_else(backbone, tmp_path):
    root = tmp_path/'clips'
    root.mkdir()
    write_clip_list(root, 5, 2)
    whole = (root/'clip 2.mp4').read_bytes()
    (root/'clip 2.mp4').write_bytes(whole[:200])
    data = VideoDataset(root/'train.txt', pipeline=small('val'), on_error='skip')
    with pytest.warns(UserWarning, match='1 of 5 clips failed'):
        first = extract_features(backbone, data, tmp_path/'cache', shard_size=2, dtype='float32', progress=False)
    assert first.indices.tolist() == [0, 1, 3, 4]
    (root/'clip 2.mp4').write_bytes(whole)  # repaired
    calls, hook = count_calls(backbone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        again = extract_features(backbone, data, tmp_path/'cache', shard_size=2, dtype='float32', progress=False)
    hook.remove()
    assert not [w for w in caught if 'failed' in str(w.message)]
    assert calls == [1] and again.indices.tolist() == [0, 1, 2, 3, 4] and again.failures == []
    torch.testing.assert_close(again.features[[0, 1, 3, 4]], first.features)
    fresh = extract_features(backbone, data, tmp_path/'fresh', shard_size=2, dtype='float32', progress=False)
    torch.testing.assert_close(again.features, fresh.features, atol=1e-5, rtol=1e-5)
    assert pd.read_csv(tmp_path/'cache'/'skipped_train.csv').empty


def test_video_identity_covers_pipeline_and_list(backbone, video_list, tmp_path):
    data = VideoDataset(video_list, pipeline=small('val'), on_error='skip')
    with pytest.warns(UserWarning): extract_features(backbone, data, tmp_path, progress=False)
    with pytest.raises(CacheMismatchError, match='another pipeline'):
        extract_features(backbone, VideoDataset(video_list, pipeline=get_pipeline('chimpbehave_val', clip_len=4, short_side=40,
                                                                                  crop_size=32), on_error='skip'), tmp_path, progress=False)
    other_list = video_list.parent/'other.txt'
    other_list.write_text(video_list.read_text().replace(' 1\n', ' 0\n'))
    with pytest.raises(CacheMismatchError, match='another dataset'):
        extract_features(backbone, VideoDataset(other_list, pipeline=small('val'), on_error='skip'), tmp_path, progress=False)


def test_augmented_views_of_real_clips_are_seeded(backbone, video_list, tmp_path):
    data = torch.utils.data.Subset(VideoDataset(video_list, pipeline=small('train')), [0, 1])
    a = extract_features(backbone, data, tmp_path/'a', aug_views=3, dtype='float32', progress=False)
    b = extract_features(backbone, data, tmp_path/'b', aug_views=3, dtype='float32', shard_size=1, batch_size=1, progress=False)
    assert a.features.shape == (2, 3, backbone.num_features)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    assert (a.features[:, 0] - a.features[:, 1]).abs().max() > 1e-3   # the draws differ from each other


def test_loader_workers_give_the_same_cache(backbone, video_list, tmp_path):
    "Seeded draws do not depend on which worker reads a clip."
    data = VideoDataset(video_list, pipeline=small('train'), on_error='skip')
    with pytest.warns(UserWarning, match='1 of 6'):
        one = extract_features(backbone, data, tmp_path/'one', aug_views=2, dtype='float32', progress=False)
    with pytest.warns(UserWarning, match='1 of 6'):
        two = extract_features(backbone, data, tmp_path/'two', aug_views=2, dtype='float32', num_workers=2, progress=False)
    assert two.indices.tolist() == one.indices.tolist() == [0, 1, 2, 4, 5]
    torch.testing.assert_close(two.features, one.features, atol=1e-5, rtol=1e-5)
