"Datasets as labs bring them: every container `open_video` reads in class folders, macOS and hidden files, flat folders, ChimpBehave's label order, raw-frame lists, and the fast `check_dataset` with its notes."
import logging

import av
import pytest

from helpers import frame_numbers, numbered_frames, write_ramp
from uas.config import uas_check
from uas.data import (CHIMPBEHAVE_CLASSES, AnnotationError, check_backends, check_dataset, clip_findings, compare_backends,
                      inspect_clip, read_annotations)
from uas.video import Pipeline, open_video, write_video

CONTAINERS = {'.ts': 'libx264', '.mts': 'libx264', '.m2ts': 'libx264', '.m4v': 'libx264', '.mpg': 'mpeg1video',
              '.mpeg': 'mpeg2video', '.flv': 'libx264', '.3gp': 'libx264', '.wmv': 'wmv2'}


def test_class_folders_take_every_container_open_video_reads(tmp_path):
    for i, (ext, codec) in enumerate(CONTAINERS.items()):
        (tmp_path/'cam').mkdir(exist_ok=True)
        write_video(tmp_path/'cam'/f'clip{ext.upper() if i % 3 == 0 else ext}', numbered_frames(6), codec=codec)
    ann = read_annotations(tmp_path)
    assert len(ann) == len(CONTAINERS) and not ann.skipped
    summary = check_dataset(ann, progress=False)
    clips = summary.attrs['clips']
    assert clips.status.tolist() == ['ok'] * len(CONTAINERS) and clips.frames.tolist() == [6] * len(CONTAINERS)
    for f in clips.file:
        with open_video(f) as video: assert frame_numbers(video.get_frames(range(6))).tolist() == list(range(6)), f


def test_hidden_files_are_passed_over(tmp_path):
    write_ramp(tmp_path/'walk'/'a.mp4')
    (tmp_path/'walk'/'._a.mp4').write_bytes(b'\x00\x05\x16\x07 macOS resource fork')
    (tmp_path/'walk'/'.hidden').mkdir()
    (tmp_path/'walk'/'.hidden'/'b.mp4').write_bytes(b'x')
    (tmp_path/'.DS_Store').write_bytes(b'x')
    (tmp_path/'walk'/'.DS_Store').write_bytes(b'x')
    summary = check_dataset(tmp_path, progress=False)
    assert summary.loc['total', ['listed', 'ok', 'unreadable', 'bad_entry']].tolist() == [1, 1, 0, 0]


def test_a_flat_folder_is_explained(tmp_path):
    for name in ('a.mp4', 'b.MTS', 'notes.txt'): (tmp_path/name).write_bytes(b'x')
    with pytest.raises(AnnotationError, match="2 clip.*lie in the folder itself.*put each behaviour's clips in a sub-folder named after it"):
        read_annotations(tmp_path)
    (tmp_path/'empty').mkdir()  # a class folder without clips does not change the advice
    with pytest.raises(AnnotationError, match='sub-folder named after it'): read_annotations(tmp_path, on_error='skip')


def test_label_order_warning_when_folders_are_a_known_dataset(tmp_path, caplog):
    for c in CHIMPBEHAVE_CLASSES: (tmp_path/'chimps'/c).mkdir(parents=True); (tmp_path/'chimps'/c/'x.mp4').write_bytes(b'x')
    with caplog.at_level(logging.WARNING, 'uas.data'): ann = read_annotations(tmp_path/'chimps')
    assert ann.classes == sorted(CHIMPBEHAVE_CLASSES) and ann.classes[ann[0].label] == 'climbing_down'
    assert "chimpbehave's classes" in caplog.text and "pass classes='chimpbehave'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, 'uas.data'):
        assert read_annotations(tmp_path/'chimps', classes='chimpbehave').classes == list(CHIMPBEHAVE_CLASSES)
        for c in ('sitting', 'walking'): (tmp_path/'lab'/c).mkdir(parents=True); (tmp_path/'lab'/c/'x.mp4').write_bytes(b'x')
        read_annotations(tmp_path/'lab')  # a subset of ChimpBehave's classes is a lab's own dataset
    assert caplog.text == ''


def test_raw_frame_lists_are_refused_with_what_to_do(tmp_path):
    (tmp_path/'frames'/'walking_01').mkdir(parents=True)
    for i in range(1, 4): (tmp_path/'frames'/'walking_01'/f'img_{i:05d}.jpg').write_bytes(b'x')
    (tmp_path/'rawframes.txt').write_text('frames/walking_01 3 2\nframes/sitting_07 40 0\n')
    with pytest.raises(AnnotationError, match='raw-frame list.*not folders of frames.*ffmpeg -i frame_dir/img_%05d.jpg'):
        read_annotations(tmp_path/'rawframes.txt')
    ann = read_annotations(tmp_path/'rawframes.txt', fmt='mammalnet')  # the way out when a MammalNet list lacks extensions
    assert [(e.path, e.label, e.animal) for e in ann] == [('frames/walking_01', 3, 2), ('frames/sitting_07', 40, 0)]


def test_write_video_takes_a_generator(tmp_path):
    path = write_video(tmp_path/'g.mp4', (f for f in numbered_frames(7)))
    assert frame_numbers(open_video(path).get_frames(range(7))).tolist() == list(range(7))
    with pytest.raises(ValueError, match='no frames'): write_video(tmp_path/'none.mp4', [])


def _faststart(path, n, cut):
    "An h264 mp4 of `n` numbered frames, index first (`faststart`), keyframe every 10 frames, cut to `cut` of its bytes."
    with av.open(str(path), 'w', options={'movflags': 'faststart'}) as out:
        stream = out.add_stream('libx264', rate=25, options={'g': '10'})
        stream.height, stream.width, stream.pix_fmt = 32, 64, 'yuv420p'
        for f in numbered_frames(n): out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        out.mux(stream.encode())
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * cut)])
    return path


def test_default_check_decodes_a_few_frames_and_still_finds_a_cut_file(tmp_path):
    (tmp_path/'c').mkdir()
    whole = _faststart(tmp_path/'c'/'whole.mp4', 100, 1)
    cut = _faststart(tmp_path/'c'/'cut.mp4', 100, 0.6)
    found = inspect_clip(whole)
    assert (found['status'], found['frames'], found['decoded'], found['fps']) == ('ok', 100, 5, 25.0)
    assert inspect_clip(whole, exact=True)['decoded'] == 100
    assert inspect_clip(cut)['status'] == 'unreadable'  # the index lists 100 frames; the last one is not there
    summary = check_dataset(tmp_path, progress=False)
    assert summary.loc['total', ['ok', 'unreadable']].tolist() == [1, 1]
    assert summary.attrs['clips'].decoded.tolist() == [0, 5] and summary.attrs['decoded'] == 'up to 5 frames per clip'
    assert check_dataset(tmp_path, progress=False, exact=True).attrs['clips'].decoded.tolist() == [0, 100]


def test_notes_say_nothing_about_uniform_long_clips(tmp_path):
    for c in ('a', 'b'): write_ramp(tmp_path/c/'x.mp4', n=40)
    summary = check_dataset(tmp_path, progress=False)
    assert clip_findings(summary) == clip_findings(summary, span=32) == ['4 frames decoded in 2 files (up to 5 frames per clip)']
    assert clip_findings(summary, span=64)[1].startswith('2 clip(s) have fewer frames than the 64 a sampled clip spans')


def test_backends_compared_when_asked(tmp_path):
    (tmp_path/'cam').mkdir()
    ts = write_video(tmp_path/'cam'/'camera.ts', numbered_frames(120), g=8, bf=3)
    mp4 = write_video(tmp_path/'cam'/'phone.mp4', numbered_frames(40))
    assert compare_backends(mp4) == '' and compare_backends(ts) != ''
    differ = check_backends(check_dataset(tmp_path, progress=False))
    assert differ.path.tolist() == ['cam/camera.ts'] and differ.reason[0] == compare_backends(ts)


def test_uas_check_prints_the_notes(tmp_path, capsys):
    lab = tmp_path/'lab'
    for c, n, fps in (('sitting', 12, 6), ('walking', 80, 25)):
        (lab/c).mkdir(parents=True)
        write_video(lab/c/f'{c}.mp4', numbered_frames(n), fps=fps)
    options = [f'data.train.ann_file={lab}', 'data.val.ann_file=null', 'data.test.ann_file=null', 'data.classes=null',
               'model.cls_head.num_classes=2']
    assert uas_check('chimpbehave_k400', options, out=str(tmp_path/'report'), backends=True) == 0
    printed = capsys.readouterr().out
    assert 'train: note: 1 clip(s) have fewer frames than the 32 a sampled clip spans' in printed  # chimpbehave_train: 32x1
    assert 'sitting/sitting.mp4 (12 frames)' in printed
    assert 'train: note: frame rates differ from 6 to 25 fps (6 fps: 1, 25 fps: 1 clips); 32 frames last 1.3 s to 5.3 s' in printed


def test_a_target_frame_rate_takes_the_same_instants_from_any_recording_rate(tmp_path):
    "Off by default; with `target_fps` a 50 fps recording gives the frames of the same instants as a 25 fps one."
    fast = write_video(tmp_path/'fast.mp4', numbered_frames(200), fps=50)
    slow = write_video(tmp_path/'slow.mp4', numbered_frames(100), fps=25)
    def shown(pipeline, path): return frame_numbers(pipeline(path)[0].permute(1, 2, 3, 0).numpy()).tolist()
    at25 = Pipeline(clip_len=4, frame_interval=2, test_mode=True, target_fps=25)
    assert shown(at25, slow) == shown(Pipeline(clip_len=4, frame_interval=2, test_mode=True), slow) == [46, 48, 50, 52]
    assert shown(at25, fast) == [92, 96, 100, 104]
    assert shown(Pipeline(clip_len=4, frame_interval=2, test_mode=True), fast) == [96, 98, 100, 102]  # the paper's default
