"Online (the paper's) and cached UAS head training compute the same head; broken clips never vanish silently."
import numpy as np
import pytest
import torch

from helpers import write_clip_list
from uas.data import VideoDataset
from uas.features import CacheMismatchError, extract_features
from uas.model import build_recognizer
from uas.config import TrainSettings
from uas.train import Learner, evaluate_cached, evaluate_online, seed_everything
from uas.video import get_pipeline

EPOCHS = 5


def train(model, data, epochs, seed=0, val_data=None, val_interval=5):
    "Train the head of `model` in micro-batches of 2 clips, 2 per optimizer step: online on a dataset, cached on a cache."
    settings = TrainSettings(mode='uas', cached=not isinstance(data, VideoDataset), epochs=epochs, batch_size=4,
                             update_interval=2, val_interval=val_interval, amp='no', seed=seed)
    return Learner(model, settings, data, val_data, device='cpu', progress=False).fit()


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
    "Seven 8-frame 32x32 mp4 clips (three classes by brightness) in `train.txt`; `broken.txt` adds a truncated one."
    root = tmp_path_factory.mktemp('probe')
    lines = write_clip_list(root, 7, 3, seed=1)
    (root/'bad.mp4').write_bytes((root/'clip 0.mp4').read_bytes()[:300])
    (root/'broken.txt').write_text('\n'.join(lines[:3] + ['bad.mp4 1'] + lines[3:]) + '\n')
    return root


def pipeline(stage): return get_pipeline(f'chimpbehave_{stage}', clip_len=8, short_side=32, crop_size=32)


def head_state(model): return {k: v.clone() for k, v in model.cls_head.state_dict().items()}


def probe_model():
    "swin3d_mini recognizer in uas mode, backbone in eval mode, dropout off: the setting where both loops must agree."
    seed_everything(0)
    return build_recognizer('swin3d_mini', 3, mode='uas', backbone_train_mode=False, dropout=0.)


def assert_same_head(a, b, start):
    for k in a: torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert (a['fc_cls.weight'] - start['fc_cls.weight']).abs().max() > 1e-4  # the head really trained (10x the tolerance)


def test_online_and_cached_training_give_the_same_head(clips, tmp_path):
    data = VideoDataset(clips/'train.txt', pipeline=pipeline('val'))
    model = probe_model()
    start = head_state(model)
    online_history = train(model, data, EPOCHS)
    online = head_state(model)
    model.cls_head.load_state_dict(start)
    cache = extract_features(model.backbone, data, tmp_path, dtype='float32', shard_size=3, progress=False)
    cached_history = train(model, cache, EPOCHS)
    assert_same_head(head_state(model), online, start)
    np.testing.assert_allclose([h['loss'] for h in cached_history], [h['loss'] for h in online_history], atol=1e-5)
    assert [h['lr'] for h in cached_history] == [h['lr'] for h in online_history]


def test_a_cache_with_a_draw_per_epoch_sees_the_online_augmentation(clips, tmp_path):
    "Augmented online training equals cached training on as many seeded draws as epochs (backbone eval, no dropout)."
    data = VideoDataset(clips/'train.txt', pipeline=pipeline('train'))
    model = probe_model()
    start = head_state(model)
    train(model, data, 3, seed=4)
    online = head_state(model)
    model.cls_head.load_state_dict(start)
    cache = extract_features(model.backbone, data, tmp_path, dtype='float32', aug_views=3, seed=4, progress=False)
    train(model, cache, 3, seed=4)
    assert_same_head(head_state(model), online, start)
    model.cls_head.load_state_dict(start)
    train(model, cache, 3, seed=5)  # another sample order: another head
    assert (head_state(model)['fc_cls.weight'] - online['fc_cls.weight']).abs().max() > 1e-6


def test_validation_metrics_agree(clips, tmp_path):
    data = VideoDataset(clips/'train.txt', pipeline=pipeline('val'))
    model = probe_model()
    cache = extract_features(model.backbone, data, tmp_path, dtype='float32', progress=False)
    online, cached = evaluate_online(model, data, device='cpu', progress=False), evaluate_cached(model, cache, device='cpu')
    assert online.metrics.keys() == cached.metrics.keys() and 'mean_class_accuracy' in online.metrics
    for k in online.metrics: assert online.metrics[k] == pytest.approx(cached.metrics[k])
    torch.testing.assert_close(online.scores, cached.scores, atol=1e-5, rtol=0)
    assert online.labels.tolist() == cached.labels.tolist() and online.indices.tolist() == cached.indices.tolist()
    history = train(model, cache, 4, val_data=cache, val_interval=2)
    assert ['val_top1_acc' in h for h in history] == [False, True, False, True]


def test_broken_clip_is_reported_and_left_out_of_training(clips, tmp_path):
    data = VideoDataset(clips/'broken.txt', pipeline=pipeline('val'), on_error='skip')
    model = probe_model()
    with pytest.warns(UserWarning, match=r"1 of 8 clips failed.*broken.txt:4.*bad.mp4"):
        cache = extract_features(model.backbone, data, tmp_path, progress=False)
    assert 3 not in cache.indices.tolist() and len(cache) == 7
    with pytest.warns(UserWarning, match=r"1 clips could not be read and were left out.*bad.mp4"):
        history = train(model, cache, 2)
    assert [h['clips'] for h in history] == [7, 7]
    with pytest.warns(UserWarning, match=r"1 clips could not be read and were left out of training.*bad.mp4"):
        history = train(model, data, 2)
    assert [h['clips'] for h in history] == [7, 7]
    one_clip = TrainSettings(mode='uas', epochs=2, batch_size=2, update_interval=2, amp='no')
    learn = Learner(model, one_clip, data, device='cpu', progress=False)
    with pytest.warns(UserWarning, match='left out of training'): learn.fit()
    assert learn.schedule.last_epoch == 2 * 8  # the batch of the bad clip alone is still an iteration of the schedule


def test_a_cache_of_failed_clips_only_is_refused_by_name(clips, tmp_path):
    (clips/'bad_only.txt').write_text('bad.mp4 1\n')
    data = VideoDataset(clips/'bad_only.txt', pipeline=pipeline('val'), on_error='skip')
    model = probe_model()
    with pytest.warns(UserWarning, match='1 of 1 clips failed'):
        cache = extract_features(model.backbone, data, tmp_path, progress=False)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match='holds no features: all 1 clips failed'):
        train(model, cache, 1)


def test_online_training_runs_the_frozen_backbone_as_the_paper(clips):
    "Default (paper) setting: backbone in train mode during training, its weights unchanged; only the head learns."
    data = VideoDataset(clips/'train.txt', pipeline=pipeline('train'))
    seed_everything(0)
    model = build_recognizer('swin3d_mini', 3, mode='uas')
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    modes = []
    model.backbone.register_forward_hook(lambda m, args, out: modes.append(m.training))
    start = head_state(model)
    train(model, data, 1)
    assert modes and all(modes)
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(head_state(model)['fc_cls.weight'], start['fc_cls.weight'])


def test_a_cache_trains_only_the_heads_of_its_own_frozen_backbone(clips, tmp_path):
    data = VideoDataset(clips/'train.txt', pipeline=pipeline('val'))
    model = probe_model()
    cache = extract_features(model.backbone, data, tmp_path, progress=False)
    other = build_recognizer('swin3d_mini', 3, mode='uas')        # fresh random backbone: other weights
    with pytest.raises(CacheMismatchError, match='another backbone'): train(other, cache, 1)
    with pytest.raises(CacheMismatchError, match='another backbone'): evaluate_cached(other, cache)
    full = build_recognizer('swin3d_mini', 3, mode='full')
    full.backbone.load_state_dict(model.backbone.state_dict())
    with pytest.raises(ValueError, match="the model was built for mode 'full'"): train(full, cache, 1)
    with pytest.raises(ValueError, match='frozen backbone'): evaluate_cached(full, cache)
