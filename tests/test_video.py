"""Video reading: the files users bring, each with its expected outcome, under a time limit.

Every file is written here by PyAV. Good files must come back with the right frame count, size, colours and
frame order from every backend that can read them; broken files must raise `VideoReadError` naming the file,
or return only frames that really decode, without crashing or hanging the process (those cases run in a
child process with a timeout, so that a segfault or a hang in a decoder fails the test instead of the run)."""
import gc, multiprocessing as mp, os, pickle, signal, sys
from contextlib import contextmanager

import av
import numpy as np
import pytest

import uas.video as video
from helpers import COLOURS, block_colours, block_numbers, colour_blocks, frame_numbers, numbered_frames, write_packed_avi, write_rotated
from uas.video import BACKENDS, VideoReadError, open_video, to_yuv420p, write_video

YUV420_TOLERANCE = 3  # RGB -> BT.601 YUV 4:2:0 -> RGB on flat blocks: rounding only


@contextmanager
def time_limit(seconds):
    "Fail the test instead of hanging when the body runs longer than `seconds`."
    def expire(*_): raise TimeoutError(f'no result within {seconds} s')
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try: yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def flat_frames(n, height, width):
    "Frame i is one flat colour, COLOURS[i]."
    return np.broadcast_to(COLOURS[:n, None, None], (n, height, width, 3)).copy()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('videos')
    f = {}
    f['one'] = write_video(d/'one.mp4', colour_blocks(1))
    f['ten'] = write_video(d/'ten.mp4', colour_blocks(10))
    f['avi'] = write_video(d/'mpeg4.avi', colour_blocks(10), codec='mpeg4', q=2)
    f['grey'] = write_video(d/'grey.mkv', numbered_frames(12)[..., 0], codec='ffv1', pix_fmt='gray')
    f['tall'] = write_video(d/'tall.mp4', flat_frames(3, 4000, 16))
    f['wide'] = write_video(d/'wide.mp4', flat_frames(3, 16, 4000))
    f['gif'] = write_video(d/'anim.gif', numbered_frames(10), codec='gif', pix_fmt='rgb8', fps=10)
    f['odd'] = write_video(d/'chimp clip é 猩猩 (1).mp4', numbered_frames(7))
    f['bframes'] = write_video(d/'bframes.mp4', numbered_frames(200), g=8, bf=3)
    f['long_gop'] = write_video(d/'long_gop.mp4', numbered_frames(120), g=250, bf=2)
    f['intra'] = write_video(d/'intra.mp4', numbered_frames(40), g=1)
    f['ts'] = write_video(d/'camera.ts', numbered_frames(120), g=8, bf=3)
    (d/'zero.mp4').touch(); f['zero'] = d/'zero.mp4'
    (d/'text.mp4').write_text('not a video\n' * 50); f['text'] = d/'text.mp4'
    # moov atom at the end (PyAV's default): cutting the file loses the index
    data = f['bframes'].read_bytes()
    (d/'truncated.mp4').write_bytes(data[:len(data) // 2]); f['truncated'] = d/'truncated.mp4'
    noise = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    (d/'garbage.mp4').write_bytes(data[:2000] + noise[2000:]); f['garbage'] = d/'garbage.mp4'
    # moov atom first (faststart): the index survives, part of the frames do not
    with av.open(str(d/'faststart.mp4'), 'w', options={'movflags': 'faststart'}) as out:
        stream = out.add_stream('libx264', rate=25, options={'bf': '3', 'g': '8'})
        stream.width, stream.height, stream.pix_fmt = 64, 32, 'yuv420p'
        for frame in numbered_frames(200): out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
        out.mux(stream.encode())
    data = (d/'faststart.mp4').read_bytes()
    (d/'fs_truncated.mp4').write_bytes(data[:len(data) // 2]); f['fs_truncated'] = d/'fs_truncated.mp4'
    (d/'fs_garbage.mp4').write_bytes(data[:len(data) // 3] + noise[len(data) // 3:len(data)]); f['fs_garbage'] = d/'fs_garbage.mp4'
    (d/'fs_garbage_tail.mp4').write_bytes(data[:2 * len(data) // 3] + noise[:len(data) // 3]); f['fs_garbage_tail'] = d/'fs_garbage_tail.mp4'
    data = write_video(d/'numbered.avi', numbered_frames(60), codec='mpeg4', q=2).read_bytes()
    (d/'truncated.avi').write_bytes(data[:len(data) // 2]); f['avi_truncated'] = d/'truncated.avi'
    return f


# Good files: (key, frames, height, width, backends that must read it)
GOOD = [('one', 1, 32, 128, BACKENDS), ('ten', 10, 32, 128, BACKENDS), ('avi', 10, 32, 128, BACKENDS),
        ('grey', 12, 32, 64, BACKENDS), ('tall', 3, 4000, 16, ('auto', 'pyav')), ('wide', 3, 16, 4000, BACKENDS),
        ('gif', 10, 32, 64, ('auto', 'pyav')), ('odd', 7, 32, 64, BACKENDS)]


@pytest.mark.parametrize('key,n,height,width,backends', GOOD, ids=[g[0] for g in GOOD])
def test_good_files(files, key, n, height, width, backends):
    for backend in backends:
        with time_limit(60), open_video(files[key], backend) as reader:
            assert (len(reader), reader.height, reader.width) == (n, height, width), backend
            assert reader.fps > 0
            frames = reader.get_frames(range(n))
            assert frames.dtype == np.uint8 and frames.shape == (n, height, width, 3)
            if key in ('one', 'ten', 'avi'):
                assert np.abs(block_colours(frames) - COLOURS.astype(int)).max() <= YUV420_TOLERANCE, backend
                assert block_numbers(frames).tolist() == list(range(n)), backend
            elif key in ('tall', 'wide'):
                centre = frames[:, height // 2, width // 2].astype(int)
                assert np.abs(centre - COLOURS[:n].astype(int)).max() <= YUV420_TOLERANCE, backend
            elif key == 'grey':  # lossless grey: exact, and the same value in all three channels
                assert (frames == numbered_frames(12)[..., :1]).all()
            else: assert frame_numbers(frames).tolist() == list(range(n)), backend
            backwards = reader.get_frames(list(range(n))[::-1])
            assert (backwards == frames[::-1]).all()


def bt601_planes(frame):
    "yuv420p planes of an RGB frame from BT.601's definition in float64: `to_yuv420p` written another way."
    kr, kb = 0.299, 0.114
    kg = 1 - kr - kb
    rows = np.array([[kr, kg, kb], [-kr, -kg, 1 - kb], [1 - kr, -kg, -kb]])
    scale = np.array([219, 224 / (2 * (1 - kb)), 224 / (2 * (1 - kr))]) / 255  # limited: Y 16-235, Cb, Cr 16-240
    matrix = np.round(rows * scale[:, None] * 65536)  # 16-bit fixed point, as the library states
    matrix[1:, 1] = -matrix[1:, 0] - matrix[1:, 2]  # chroma rows sum to zero: greys keep Cb = Cr = 128
    rgb = frame.astype(np.float64)
    H, W, _ = rgb.shape
    means = rgb.reshape(H // 2, 2, W // 2, 2, 3).mean(axis=(1, 3))  # chroma from 2x2 blocks
    planes = [rgb @ matrix[0] / 65536 + 16, means @ matrix[1] / 65536 + 128, means @ matrix[2] / 65536 + 128]
    return np.concatenate([np.floor(p + 0.5).ravel() for p in planes]).reshape(H * 3 // 2, W)  # rounded half up


def test_yuv420p_planes_follow_bt601():
    "Equal, not close: float64 holds these sums of integers and quarters over 65536 without error."
    rng = np.random.default_rng(0)
    blocks = np.repeat(np.repeat(COLOURS[None], 2, axis=0), 2, axis=1)  # a 2x2 block of each colour
    for frame in [*rng.integers(0, 256, (3, 16, 32, 3), dtype=np.uint8), blocks]:
        assert (to_yuv420p(frame) == bt601_planes(frame)).all()
    white, black, grey = (to_yuv420p(np.full((2, 2, 3), v, np.uint8)).ravel().tolist() for v in (255, 0, 128))
    assert white == [235] * 4 + [128] * 2 and black == [16] * 4 + [128] * 2 and grey[4:] == [128] * 2


def test_encoder_gets_exactly_these_planes(tmp_path):
    "Lossless x264 (qp=0) stores the planes it is handed: decoded in yuv420p, they are `to_yuv420p` of the frames."
    frames = np.random.default_rng(1).integers(0, 256, (4, 16, 32, 3), dtype=np.uint8)
    path = write_video(tmp_path/'lossless.mp4', frames, qp=0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        assert (context.color_range, context.colorspace) == (1, 6)  # limited range, BT.601
        decoded = np.stack([f.to_ndarray() for f in container.decode(stream)])
    assert (decoded == np.stack([to_yuv420p(f) for f in frames])).all()


def test_decord_refuses_what_the_fallback_reads(files):
    with pytest.raises(VideoReadError, match='anim.gif'): open_video(files['gif'], 'decord')
    with pytest.raises(VideoReadError, match='tall.mp4'): open_video(files['tall'], 'decord').get_frames([0])
    reader = open_video(files['tall'])
    reader.get_frames([0])
    assert reader.backend == 'decord->pyav'


def test_lossless_rgb_is_exact(tmp_path):
    path = write_video(tmp_path/'rgb.mp4', colour_blocks(4), codec='libx264rgb', pix_fmt='rgb24', qp=0)
    for backend in BACKENDS:
        assert (open_video(path, backend).get_frames(range(4)) == colour_blocks(4)).all()


@pytest.mark.parametrize('key', ['bframes', 'long_gop', 'intra'])
def test_frame_exact_random_access(files, key):
    "decord's seeking has had accuracy bugs: random sets, orders and repeats must return exactly the frames asked."
    rng = np.random.default_rng(1)
    for backend in BACKENDS:
        reader = open_video(files[key], backend)
        n = len(reader)
        for _ in range(15):
            wanted = rng.integers(0, n, size=int(rng.integers(1, 20)))
            assert frame_numbers(reader.get_frames(wanted)).tolist() == wanted.tolist(), backend
        clips = video.sample_frames(n, 16, 2, num_clips=3, test_mode=True).ravel()
        assert frame_numbers(reader.get_frames(clips)).tolist() == clips.tolist()


def test_transport_stream_is_frame_exact(files):
    """decord returns shifted frames from MPEG-TS (index 0 -> frame 8 here) and PyAV's seeks land past the keyframe
    asked for: `auto` reads .ts with PyAV, which decodes what a seek missed once more from the start."""
    reader = open_video(files['ts'])
    assert reader.backend == 'pyav' and len(reader) == 120
    rng = np.random.default_rng(3)
    for _ in range(5):
        wanted = rng.integers(0, 120, size=20)
        assert frame_numbers(reader.get_frames(wanted)).tolist() == wanted.tolist()


def decoded_in_order(path):
    "Every frame of `path` decoded from the start by plain PyAV on one thread, as RGB, turned by the display rotation."
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        return np.stack([np.rot90(f.to_ndarray(format='rgb24'), round(f.rotation / 90) % 4) for f in container.decode(stream)])


def test_decoder_sees_the_first_frame_before_a_seek(files, monkeypatch):
    """FFmpeg takes the x264 version, which decides how old x264 4:4:4 streams decode, from the first frame's SEI;
    a seek straight after opening skips it. The reader decodes that frame first, once per opening, then seeks."""
    reader = open_video(files['bframes'], 'pyav')
    events = []
    prime, run = reader._prime, reader._run
    monkeypatch.setattr(reader, '_prime', lambda: events.append('first frame') or prime())
    monkeypatch.setattr(reader, '_run', lambda key, fresh: events.append(key) or run(key, fresh))
    assert frame_numbers(reader.get_frames([150, 190, 3])).tolist() == [150, 190, 3]
    assert events == [0, 144, 184]
    events.clear()
    assert frame_numbers(reader.get_frames([150, 190])).tolist() == [150, 190]
    assert events == [144, 'first frame', 184]


@pytest.mark.parametrize('kind', ['mpeg4', 'packed mpeg4', 'libx264'])
def test_avi_with_bframes(tmp_path, kind):
    """AVI stores timestamps in decoding order; with B-frames (forced in x264, which would choose none on these frames;
    packed as XviD packs them) every frame, read all at once or one by one, equals sequential decoding."""
    frames, path = numbered_frames(40), tmp_path/f'{kind}.avi'
    if kind == 'packed mpeg4': write_packed_avi(path, frames)
    elif kind == 'mpeg4': write_video(path, frames, codec='mpeg4', g=12, q=2, bf=2)
    else: write_video(path, frames, g=12, bf=3, **{'x264-params': 'b-adapt=0'})
    in_order = decoded_in_order(path)
    assert frame_numbers(in_order).tolist() == list(range(40))
    for backend in ('auto', 'pyav'):
        reader = open_video(path, backend)
        assert len(reader) == 40
        assert (reader.get_frames(range(40)) == in_order).all(), backend
        one_by_one = np.concatenate([reader.get_frames([i]) for i in range(40)])
        assert (one_by_one == in_order).all(), backend


@pytest.mark.parametrize('degrees', [90, 180, 270])
def test_display_rotation_is_applied_by_every_backend(tmp_path, degrees):
    "Frames come out upright, as players show them, with the height and width of the turned frames, from every backend."
    path = write_rotated(tmp_path/f'rotated{degrees}.mp4', numbered_frames(6), degrees)
    expected = decoded_in_order(path)
    assert expected.shape[1:3] == ((64, 32) if degrees != 180 else (32, 64))
    assert frame_numbers(np.rot90(expected, -degrees // 90, axes=(1, 2))).tolist() == list(range(6))
    for backend in BACKENDS:
        reader = open_video(path, backend)
        assert (len(reader), reader.height, reader.width) == (6, *expected.shape[1:3]), backend
        assert (reader.get_frames([5, 0, 3]) == expected[[5, 0, 3]]).all(), backend
        assert reader.get_frames([]).shape == (0, *expected.shape[1:3], 3)


def test_decord_messages_stay_off_the_terminal(files, capfd, monkeypatch):
    """decord writes 'ERROR opening' to file descriptor 2 from C++ for a file it cannot open, whatever Python's
    logging says; open_video keeps that off while it tries decord, and its own error still names the file."""
    decord = pytest.importorskip('decord')
    with pytest.raises(RuntimeError): decord.VideoReader(str(files['text']))
    assert 'ERROR opening' in capfd.readouterr().err  # the message looked for below, and that capfd sees it
    with pytest.raises(VideoReadError, match='text.mp4'): open_video(files['text'])
    with pytest.raises(VideoReadError, match='text.mp4'): open_video(files['text'], 'decord')
    assert capfd.readouterr().err == ''

    def refuse(path, **kwargs):  # a decord that cannot open the file, complaining as decord's C++ does
        os.write(2, f'video_reader.cc:83: ERROR opening: {path}\n'.encode())
        raise RuntimeError(f'Error reading {path}')
    monkeypatch.setattr(decord, 'VideoReader', refuse)
    reader = open_video(files['ten'])
    assert reader.backend == 'pyav' and block_numbers(reader.get_frames(range(10))).tolist() == list(range(10))
    assert capfd.readouterr().err == ''


def test_decord_and_pyav_agree(files):
    "Both backends wrap the same FFmpeg decoder and colour conversion: the bytes are equal, no tolerance needed."
    for key in ('bframes', 'ten', 'avi'):
        a, b = (open_video(files[key], backend) for backend in ('decord', 'pyav'))
        assert len(a) == len(b) and a.fps == b.fps and (a.height, a.width) == (b.height, b.width)
        indices = np.arange(len(a))
        assert (a.get_frames(indices) == b.get_frames(indices)).all(), key


def test_repeated_indices_decoded_once(files, monkeypatch):
    asked = []
    reader = open_video(files['bframes'], 'pyav')
    decode = reader._decode
    monkeypatch.setattr(reader, '_decode', lambda wanted: asked.append(wanted) or decode(wanted))
    frames = reader.get_frames([7, 3, 7, 7, 3, 150])
    assert asked == [[3, 7, 150]]
    assert frame_numbers(frames).tolist() == [7, 3, 7, 7, 3, 150]


def test_looped_clip_decodes_each_frame_once(files, monkeypatch):
    "A 32-frame clip looped out of a 10-frame video asks the backend for 10 frames, not 32."
    reader = open_video(files['ten'], 'pyav')
    asked = []
    decode = reader._decode
    monkeypatch.setattr(reader, '_decode', lambda wanted: asked.append(wanted) or decode(wanted))
    assert reader.get_frames(video.sample_frames(10, 32, 1, test_mode=True).ravel()).shape == (32, 32, 128, 3)
    assert asked == [list(range(10))]


def test_pyav_decodes_only_what_it_needs(files, monkeypatch):
    "Late frames are decoded from the keyframe before them (every 8 frames here), not from frame 0."
    reader = open_video(files['bframes'], 'pyav')
    starts = []
    run = reader._run
    monkeypatch.setattr(reader, '_run', lambda key, fresh: starts.append(key) or run(key, fresh))
    reader.get_frames([190, 191, 197])
    assert starts == [184]


def test_without_decord_auto_uses_pyav(files, monkeypatch):
    monkeypatch.setitem(sys.modules, 'decord', None)
    reader = open_video(files['ten'])
    assert reader.backend == 'pyav' and len(reader) == 10
    with pytest.raises(VideoReadError, match='decord backend is not installed'): open_video(files['ten'], 'decord')


def test_indices_out_of_range_and_empty(files):
    reader = open_video(files['ten'])
    with pytest.raises(IndexError, match='ten.mp4'): reader.get_frames([10])
    with pytest.raises(IndexError): reader.get_frames([-1])
    assert reader.get_frames([]).shape == (0, 32, 128, 3)


def test_error_names_file_and_pickles(files):
    with pytest.raises(VideoReadError) as info: open_video(files['text'])
    err = info.value
    assert str(files['text']) in str(err) and err.path == str(files['text']) and err.reason
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.path, again.reason) == (VideoReadError, err.path, err.reason)


# Broken files are read in a child process: a decoder crash or hang must fail this test, not kill the test run.
def probe(path, backend, conn):
    "Read every frame of `path` and send back what came out, or the error."
    gc.collect()  # in the child: frees what the parent left in reference cycles, decord readers included
    try:
        reader = open_video(path, backend)
        frames = reader.get_frames(range(len(reader)))
        conn.send(dict(frames=len(frames), numbers=frame_numbers(frames).tolist()))
    except VideoReadError as e: conn.send(dict(error=str(e)))
    except Exception as e: conn.send(dict(unexpected=f'{type(e).__name__}: {e}'))


def read_isolated(path, backend, timeout=60):
    "`probe` in a forked child process, with a time limit."
    ctx = mp.get_context('fork' if sys.platform == 'linux' else 'spawn')
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=probe, args=(str(path), backend, send))
    child.start(); send.close()
    try:
        if not receive.poll(timeout): pytest.fail(f'no result within {timeout} s: {path} ({backend})')
        outcome = receive.recv()
    except EOFError: outcome = None
    finally:
        child.join(timeout)
        if child.is_alive(): child.kill(); child.join()
    assert child.exitcode == 0 and outcome is not None, f'reading {path} with {backend} crashed (exit code {child.exitcode})'
    return outcome


BROKEN = [('zero', 'raise'), ('text', 'raise'), ('truncated', 'raise'), ('garbage', 'raise'),
          ('fs_truncated', 'raise or partial'), ('fs_garbage', 'raise or partial'),
          ('fs_garbage_tail', 'raise or partial'), ('avi_truncated', 'raise or partial')]


@pytest.mark.parametrize('key,expected', BROKEN, ids=[b[0] for b in BROKEN])
@pytest.mark.parametrize('backend', BACKENDS)
def test_broken_files(files, key, expected, backend):
    outcome = read_isolated(files[key], backend)
    assert 'unexpected' not in outcome, outcome
    if 'error' in outcome:
        assert str(files[key]) in outcome['error']
        return
    assert expected == 'raise or partial', f'{key} should not read: {outcome}'
    numbers, total = outcome['numbers'], (60 if key.startswith('avi') else 200)
    assert 0 < outcome['frames'] < total
    assert numbers == sorted(set(numbers)) and numbers[-1] < total


def test_failed_decord_reader_is_released(files):
    """A decord reader destroyed in a forked child can hang or crash it (a live reader in a reference cycle,
    collected by a DataLoader worker, hung our test run). A failed reader must not linger in an exception's frames."""
    import decord
    gc.collect()
    kept = []
    try: open_video(files['tall'], 'decord').get_frames([0])
    except VideoReadError as e: kept.append(e)  # an exception kept alive, as a log or a test framework keeps it
    try: open_video(files['fs_garbage_tail'], 'decord').get_frames(range(200))
    except VideoReadError as e: kept.append(e)
    reader = open_video(files['tall'])
    reader.get_frames([0])
    kept.append(reader)
    assert reader.backend == 'decord->pyav'
    assert not [o for o in gc.get_objects() if type(o) is decord.VideoReader]
    assert read_isolated(files['ten'], 'auto')['frames'] == 10
