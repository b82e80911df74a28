"`uas_timeline` end to end: the files it writes, a recording cut short, a run killed and resumed, and re-labelling from cached windows alone."
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import uas.timeline
from uas.timeline import BORIS_COLUMNS, BOUT_COLUMNS, FrameStream, make_recording, random_model_file, uas_timeline

SPEC = dict(name='chimpbehave_test', clip_len=8, frame_interval=2, short_side=32, crop_size=32)  # windows of 1 s at 16 fps


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "One `uas_timeline` run, in a fresh process, on a folder of a 10 s recording, the same cut short, and a text file."
    root = tmp_path_factory.mktemp('timeline')
    videos = root/'videos'
    truth = make_recording(videos/'rec.mp4', [('sitting', 3), ('walking', 2), ('hanging', 3), ('running', 2)], clip_frames=16)
    data = (videos/'rec.mp4').read_bytes()
    (videos/'cut.mp4').write_bytes(data[:len(data) * 6 // 10])
    (videos/'notes.mp4').write_text('not a video')
    model = random_model_file(root/'a.pth', root/'backbone.pth', pipeline=SPEC, seed=1)
    script = Path(sys.executable).parent/'uas_timeline'
    res = subprocess.run([str(script), str(model), str(videos), '--stride', '0.5s', '--out', str(root/'out'), '--no-progress'],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(root=root, out=root/'out', videos=videos, truth=truth, stdout=res.stdout, script=script)


def test_bouts_csv_tiles_the_recording(run):
    bouts = pd.read_csv(run['out']/'rec_bouts.csv')
    assert list(bouts.columns) == list(BOUT_COLUMNS)
    assert bouts.start_s.iloc[0] == 0 and bouts.end_s.iloc[-1] == pytest.approx(10.0)
    assert (bouts.start_s.to_numpy()[1:] == bouts.end_s.to_numpy()[:-1]).all()
    assert ((bouts.mean_probability > 0) & (bouts.mean_probability <= 1)).all()
    assert bouts.windows.sum() == len(pd.read_csv(run['out']/'rec_windows.csv')) == (160 - 16) // 8 + 1
    assert (run['out']/'rec_ethogram.png').stat().st_size > 0
    assert json.loads((run['out']/'rec_report.json').read_text())['complete'] is True


def check_boris(path, duration):
    "BORIS events: its columns, a STOP after each START of the same behaviour, times within the video."
    events = pd.read_csv(path, keep_default_na=False)
    assert list(events.columns) == list(BORIS_COLUMNS)
    assert events['Time'].is_monotonic_increasing
    assert events['Time'].between(0, duration + 1e-6).all()
    for _, rows in events.groupby('Behavior'):
        assert rows['Behavior type'].tolist() == ['START', 'STOP'] * (len(rows) // 2)
        times = rows['Time'].to_numpy()
        assert (times[1::2] > times[::2]).all()
    return events


def test_boris_csv_pairs_start_and_stop(run):
    events = check_boris(run['out']/'rec_boris.csv', 10.0)
    assert len(events) == 2 * len(pd.read_csv(run['out']/'rec_bouts.csv'))


def test_a_truncated_recording_gives_the_bouts_before_the_damage_and_a_report(run):
    report = json.loads((run['out']/'cut_report.json').read_text())
    assert report['complete'] is False and 'stopped after ' in report['stopped']
    assert 16 <= report['frames_read'] < report['frames_declared'] == 160
    seconds = report['seconds_read']
    assert 'cut.mp4: reading stopped after ' in run['stdout']
    bouts = pd.read_csv(run['out']/'cut_bouts.csv')
    assert bouts.end_s.iloc[-1] == pytest.approx(seconds, abs=1e-3)
    check_boris(run['out']/'cut_boris.csv', seconds)
    # the windows before the damage are those of the whole recording
    whole, cut = pd.read_csv(run['out']/'rec_windows.csv'), pd.read_csv(run['out']/'cut_windows.csv')
    pd.testing.assert_frame_equal(cut.iloc[:-1, 2:], whole.iloc[:len(cut) - 1, 2:])  # the last window's segment ends earlier


def test_an_unreadable_file_is_listed_and_the_others_go_on(run):
    problems = pd.read_csv(run['out']/'problems.csv')
    assert [Path(p).name for p in problems.path] == ['notes.mp4']


def test_another_model_file_relabels_without_decoding(run, monkeypatch, capsys):
    class NoDecoding(FrameStream):
        def __iter__(self): raise AssertionError('the video was decoded')
    def no_backbone(*args, **kw): raise AssertionError('the backbone was loaded')
    monkeypatch.setattr(uas.timeline, 'FrameStream', NoDecoding)
    monkeypatch.setattr(uas.timeline, 'load_model', no_backbone)
    other = random_model_file(run['root']/'b.pth', run['root']/'backbone.pth', pipeline=SPEC, seed=2)
    assert uas_timeline(str(other), str(run['videos']/'rec.mp4'), stride='8f', out=str(run['root']/'relabel'),
                        cache=str(run['out']/'windows'), no_figure=True, no_progress=True) == 0
    assert 're-labelled from cached windows' in capsys.readouterr().out
    first, second = pd.read_csv(run['out']/'rec_windows.csv'), pd.read_csv(run['root']/'relabel'/'rec_windows.csv')
    assert len(first) == len(second) and not first.filter(like='p_').equals(second.filter(like='p_'))


def test_the_benchmark_registers_with_uas_bench(tmp_path):
    res = subprocess.run([sys.executable, '-m', 'uas.bench', 'timeline', '--quick', '--out_dir', str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path/'timeline.json').read_text())
    assert data['headline']['swin3d_mini_video_s_per_s'] > 0 and 0 < data['results']['relabel_10min_s'] < 5


def test_a_killed_run_resumes_after_its_last_whole_chunk(run, tmp_path):
    model = random_model_file(tmp_path/'wide.pth', run['root']/'backbone.pth', pipeline=dict(SPEC, clip_len=16, crop_size=48,
                                                                                                  short_side=48))
    video, out = run['videos']/'rec.mp4', tmp_path/'out'
    options = dict(stride='8f', chunk_size=2, batch_size=1, no_figure=True, no_progress=True)
    args = [f"--{k.replace('_', '-')}" + ('' if v is True else f'={v}') for k, v in options.items()]
    proc = subprocess.Popen([str(run['script']), str(model), str(video), '--out', str(out), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 120
    while not list(out.glob('windows/*/chunk_00001.pt')) and proc.poll() is None and time.time() < deadline: time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = next((out/'windows').iterdir())
    assert not (cache/'done.json').exists(), 'the run finished before it could be killed'
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob('chunk_*.pt')}
    assert {'chunk_00000.pt', 'chunk_00001.pt'} <= set(before) and not list(cache.glob('*.tmp'))
    assert uas_timeline(str(model), str(video), out=str(out), **options) == 0                    # the rerun
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob('chunk_*.pt') if p.name in before} == before  # not embedded again
    assert uas_timeline(str(model), str(video), out=str(tmp_path/'fresh'), **options) == 0     # an uninterrupted run
    resumed, whole = (pd.read_csv(tmp_path/d/'rec_windows.csv') for d in ('out', 'fresh'))
    assert len(resumed) == len(whole) == (160 - 32) // 8 + 1
    np.testing.assert_allclose(resumed.filter(like='p_').to_numpy(), whole.filter(like='p_').to_numpy(), atol=1e-3)
