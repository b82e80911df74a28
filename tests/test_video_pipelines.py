"""The paper's named pipelines on real video files: the shapes the model takes, the frames each view
holds, and the values of the views.

Each clip is written by PyAV with flat frames whose colour encodes the frame number (red = 12 * (i // 16),
green = 20 + 12 * (i % 16)), which survives h264, resizing and cropping, so that every view can be read back as a
list of frame numbers and compared with `sample_frames`."""
import gc, pickle

import numpy as np
import pytest
import torch

from uas.video import MEAN, STD, RandomResizedCrop, get_pipeline, pipeline_names, write_video

SHAPES = {  # views, channels, frames, height, width: the reference configs (mmaction2 0.x, Video Swin's fork)
    'chimpbehave_train': (1, 3, 32, 224, 224), 'chimpbehave_val': (1, 3, 32, 224, 224), 'chimpbehave_test': (3, 3, 32, 224, 224),
    'mammalnet_train': (1, 3, 32, 224, 224), 'mammalnet_val': (1, 3, 32, 224, 224), 'mammalnet_test': (12, 3, 32, 224, 224),
    'k700_diff_train': (1, 3, 32, 224, 224), 'k700_diff_val': (1, 3, 32, 224, 224), 'k700_diff_test': (12, 3, 32, 224, 224),
}


def coded_frames(n, height, width):
    "Flat frames: red 12*(i//16), green 20 + 12*(i%16), blue 128 (frames up to 335; 12 levels apart, h264 errs by 3)."
    i = np.arange(n)
    colour = np.stack([12 * (i // 16), 20 + 12 * (i % 16), np.full(n, 128)], axis=1).astype(np.uint8)
    return np.broadcast_to(colour[:, None, None], (n, height, width, 3)).copy()


def frame_codes(views):
    "Frame numbers held by each view of a normalised `[V, 3, T, H, W]` tensor (read at the centre pixel)."
    rgb = views[:, :, :, views.shape[3] // 2, views.shape[4] // 2] * torch.tensor(STD)[:, None] + torch.tensor(MEAN)[:, None]
    return (torch.round(rgb[:, 0] / 12) * 16 + torch.round((rgb[:, 1] - 20) / 12)).long().numpy()


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp('clips')
    return dict(chimpbehave=write_video(d/'chimp miniclip.mp4', coded_frames(20, 224, 224)),  # ChimpBehave: 20 frames, 224x224
                other=write_video(d/'mammal.mp4', coded_frames(300, 240, 320)))  # 300 frames of 320x240


def test_all_names_listed():
    assert sorted(pipeline_names()) == sorted(SHAPES)


@pytest.mark.parametrize('name', list(SHAPES))
def test_named_pipeline_on_a_real_clip(clips, name):
    pipeline = get_pipeline(name)
    path = clips['chimpbehave' if name.startswith('chimpbehave') else 'other']
    n = 20 if name.startswith('chimpbehave') else 300
    views = pipeline(path, rng=7)
    assert views.dtype == torch.float32 and tuple(views.shape) == SHAPES[name]
    assert pipeline.views == SHAPES[name][0] and pipeline.train == name.endswith('_train')
    # which frames each view holds: views are crop by crop, clip by clip within a crop (mmaction's FormatShape)
    expected = pipeline.indices(n, rng=7)
    crops = pipeline.views // pipeline.num_clips
    assert (frame_codes(views) == np.tile(expected, (crops, 1))).all(), name
    if not pipeline.train: assert torch.equal(views, pipeline(path))


def test_test_views_of_a_300_frame_video(clips):
    "MammalNet test: 4 clips at offsets 29, 88, 148, 207 (mmaction 0.x), each cut into 3 crops."
    views = get_pipeline('mammalnet_test')(clips['other'])
    codes = frame_codes(views)
    assert codes[:4, 0].tolist() == [29, 88, 148, 207]
    assert codes[4:8, 0].tolist() == codes[8:, 0].tolist() == [29, 88, 148, 207]
    assert (np.diff(codes, axis=1) == 2).all()


def test_chimpbehave_views_loop_the_clip(clips):
    views = get_pipeline('chimpbehave_test')(clips['chimpbehave'])
    assert frame_codes(views)[0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18] * 3 + [0, 2]
    assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])  # 224x224 frames: three equal crops
    views = get_pipeline('chimpbehave_val')(clips['chimpbehave'])
    assert frame_codes(views)[0].tolist() == list(range(20)) + list(range(12))


def test_train_pipeline_is_random_but_seeded(clips):
    pipeline = get_pipeline('mammalnet_train')
    a, b, c = pipeline(clips['other'], rng=1), pipeline(clips['other'], rng=1), pipeline(clips['other'], rng=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = {int(frame_codes(pipeline(clips['other'], rng=s))[0, 0]) for s in range(8)}
    assert len(starts) > 1 and all(0 <= s <= 300 - 64 for s in starts)


def test_small_overrides_for_the_synthetic_experiment(clips):
    views = get_pipeline('chimpbehave_train', clip_len=8, short_side=64, crop_size=56)(clips['chimpbehave'], rng=0)
    assert tuple(views.shape) == (1, 3, 8, 56, 56)
    views = get_pipeline('k700_diff_test', clip_len=8, num_clips=2, crop_size=64)(clips['other'])
    assert tuple(views.shape) == (6, 3, 8, 64, 64)


BAD_RANGES = [dict(area_range=(0.5, 1.5)), dict(area_range=(0, 1)), dict(area_range=(0.9, 0.5)),
              dict(area_range=(0.5,)), dict(aspect_ratio_range=(4 / 3, 3 / 4)), dict(aspect_ratio_range=(-1, 1))]


@pytest.mark.parametrize('kw', BAD_RANGES, ids=str)
def test_bad_crop_ranges_fail_when_built(kw):
    "mmaction 0.x asserts 0 < low <= high (<= 1 for the area); here building the step fails, naming the argument."
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f'^{name} must be'): RandomResizedCrop(**kw)
    with pytest.raises(ValueError, match=f'^{name} must be'): get_pipeline('mammalnet_train', **kw)


def test_pipeline_pickles_for_dataloader_workers(clips):
    pipeline = pickle.loads(pickle.dumps(get_pipeline('chimpbehave_test')))
    assert tuple(pipeline(clips['chimpbehave']).shape) == (3, 3, 32, 224, 224)


class PipelineClips(torch.utils.data.Dataset):
    "Four draws of one clip through a pipeline, seeded by index."
    def __init__(self, pipeline, path): self.pipeline, self.path = pipeline, path
    def __len__(self): return 4
    def __getitem__(self, i): return self.pipeline(self.path, rng=i)


def test_pipeline_in_forked_dataloader_workers(clips):
    "Readers must not hang forked workers: the parent reads first (as a dataset check would), workers collect garbage."
    pipeline = get_pipeline('chimpbehave_train', clip_len=8, short_side=64, crop_size=56)
    for backend in ('decord', 'pyav'): get_pipeline('chimpbehave_val', backend=backend)(clips['chimpbehave'])
    loader = torch.utils.data.DataLoader(PipelineClips(pipeline, clips['chimpbehave']), batch_size=2, num_workers=2,
                                         multiprocessing_context='fork', timeout=120, worker_init_fn=lambda _: gc.collect())
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(2, 1, 3, 8, 56, 56)] * 2
    assert torch.equal(batches[1][0], pipeline(clips['chimpbehave'], rng=2))
