"""Fixtures that several tests and notebooks share, defined once.

Tests import them by name (pytest puts `tests/` on the path); a notebook that needs the same fixture puts the
checkout's `tests/` folder on `sys.path` in a hidden import cell and imports from here."""
import io
from pathlib import Path

import numpy as np
import torch

from uas.data import read_annotations
from uas.video import open_video, to_yuv420p, write_video


def numbered_frames(n, height=32, width=64):
    "n RGB frames whose eight vertical bars spell the frame index in binary (bar b white when bit b is set)."
    bits = (np.arange(n)[:, None] >> np.arange(8)) & 1
    bars = np.repeat(bits * 255, width // 8, axis=1).astype(np.uint8)
    return np.broadcast_to(bars[:, None, :, None], (n, height, width, 3)).copy()


def frame_numbers(frames):
    "Read back the index that `numbered_frames` drew into each frame."
    width = frames.shape[2]
    centres = frames[:, frames.shape[1] // 2, width // 16::width // 8, 0]
    return ((centres > 127) << np.arange(8)).sum(1)


COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255],
                    [0, 0, 0], [128, 128, 128], [255, 255, 0], [40, 90, 200]], np.uint8)


def colour_blocks(n, height=16):
    """n frames `[n, 2*height, 128, 3]`: eight flat 16-pixel-wide blocks, one per colour of `COLOURS`, in the top half,
    and the frame index spelt in the bottom half by the bars of `numbered_frames`."""
    blocks = np.broadcast_to(np.repeat(COLOURS, 16, axis=0)[None, None], (n, height, 128, 3))
    return np.concatenate([blocks, numbered_frames(n, height, 128)], axis=1)


def block_colours(frames):
    "The colour at the centre of each block of `colour_blocks` frames, as ints `[T, 8, 3]`."
    return frames[:, frames.shape[1] // 4, 8::16].astype(int)


def block_numbers(frames):
    "Read back the frame index that `colour_blocks` drew under the blocks."
    return frame_numbers(frames[:, frames.shape[1] // 2:])


VOP = b'\x00\x00\x01\xb6'  # MPEG-4 part 2: the start code of a frame (video object plane)
N_VOP = VOP + bytes([0b01010000, 0b01001111])  # a P frame marked not coded (5-bit time increment: 25 fps), then stuffing


def write_packed_avi(path, frames):
    """An mpeg4 .avi of RGB `frames` whose B-frames are packed as XviD and DivX store them: a B-frame rides in the packet
    of the frame decoded before it, an N-VOP packet holds its place, and DivX user data ending in 'p' says so."""
    import av
    path = Path(path)
    unpacked = write_video(path.with_name(path.stem + '_unpacked.avi'), frames, codec='mpeg4', q=2, bf=1, g=12)
    vop_type = lambda data: data[data.find(VOP) + 4] >> 6  # 0 I, 1 P, 2 B
    with av.open(str(unpacked)) as source, av.open(str(path), 'w') as out:
        stream = source.streams.video[0]
        packets = [bytes(p) for p in source.demux(stream) if p.size]
        packed, i = [], 0
        while i < len(packets):
            if i + 1 < len(packets) and vop_type(packets[i + 1]) == 2: packed += [packets[i] + packets[i + 1], N_VOP]; i += 2
            else: packed.append(packets[i]); i += 1
        first = packed[0].find(VOP)
        packed[0] = packed[0][:first] + b'\x00\x00\x01\xb2DivX503b1393p\x00' + packed[0][first:]
        target = out.add_stream_from_template(stream)
        for n, data in enumerate(packed):
            packet = av.Packet(data)
            packet.pts = packet.dts = n
            packet.time_base, packet.stream, packet.is_keyframe = stream.time_base, target, vop_type(data) == 0
            out.mux(packet)
    unpacked.unlink()
    return path


def write_rotated(path, frames, degrees):
    "An h264 .mp4 of RGB `frames` whose display matrix turns them `degrees` counter-clockwise; returns the path."
    import av
    with av.open(str(path), 'w') as out:
        stream = out.add_stream('libx264', rate=25)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], 'yuv420p'
        stream.set_display_rotation(degrees)
        for frame in frames: out.mux(stream.encode(av.VideoFrame.from_ndarray(to_yuv420p(frame), format='yuv420p')))
        out.mux(stream.encode())
    return Path(path)


def decode_all(path):
    "Every frame of the video at `path`, uint8 `[T, H, W, 3]`."
    with open_video(path) as video: return video.get_frames(range(len(video)))


def read_list(path):
    "The `(path, label)` pairs of an mmaction list, in order."
    return [(e.path, e.label) for e in read_annotations(path)]


def counts_follow_weights(counts, weights, total:int, floor:int=8) -> bool:
    "Whether every class count lies within one clip of its share of `total` by `weights`, or sits at `floor`."
    counts, share = np.asarray(counts), np.asarray(weights, float) / sum(weights) * total
    return bool(((np.abs(counts - share) <= 1) | ((counts == floor) & (share < floor))).all())


def ramp_frames(n=8, size=32):
    "n flat grey frames (n <= 11), frame t of brightness 20 + 20*t: a frame's brightness tells which frame it is."
    return np.broadcast_to((20 + 20*np.arange(n, dtype=np.uint8))[:, None, None, None], (n, size, size, 3))


def write_ramp(path, n=8, size=32):
    "A small h264 clip of `ramp_frames` at `path` (folders created); returns the path."
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, ramp_frames(n, size))


def write_clip_list(folder, n:int, num_classes:int, seed:int=0):
    """`n` 8-frame 32x32 mp4 clips `clip {i}.mp4` in `folder`, clip i of class `i % num_classes` (brighter for a higher
    class, over noise drawn from `seed`), listed as `path label` lines in `folder/train.txt`; returns the lines."""
    folder, rng, step = Path(folder), np.random.default_rng(seed), 256 // num_classes
    lines = []
    for i in range(n):
        frames = (rng.integers(0, step, (8, 32, 32, 3)) + step * (i % num_classes)).astype(np.uint8)
        lines.append(f'{write_video(folder/f"clip {i}.mp4", frames, fps=8).name} {i % num_classes}')
    (folder/'train.txt').write_text('\n'.join(lines) + '\n')
    return lines


def write_broken(folder):
    "Three clips no reader can use in `folder`: zero bytes, text named .mp4, a truncated mp4; their paths."
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder/'empty.mp4').write_bytes(b'')
    (folder/'text.mp4').write_text('this is not a video\n')
    data = write_ramp(folder/'cut.mp4').read_bytes()
    (folder/'cut.mp4').write_bytes(data[:len(data)//2])
    return [folder/'empty.mp4', folder/'text.mp4', folder/'cut.mp4']


def paper_rule(name):
    """(lr, weight decay) of a trainable parameter under the paper's recipe, as mmcv applies its `custom_keys`
    (the longest key found in the name wins): a `relative_position_bias_table` gets 3e-4 and no decay, every other
    `backbone.*` parameter (LoRA adapters and norms included) lr x0.1 = 3e-5 with decay 0.05, the rest 3e-4 / 0.05."""
    if 'relative_position_bias_table' in name: return 3e-4, 0.0
    if name.startswith('backbone.'): return 3e-5, 0.05
    return 3e-4, 0.05


def official_checkpoint(state_dict:dict):
    """`state_dict` (official names: `backbone.*`, `cls_head.fc_cls.*`) wrapped as mmcv saves a checkpoint after
    training: numpy scalars in `meta` (which `torch.load(weights_only=True)` refuses unless allowed) and optimizer state."""
    meta = {'epoch': 30, 'iter': np.int64(12345), 'best_score': np.float64(0.8),
            'lr': np.float32(3e-5), 'flag': np.bool_(True), 'mmcv_version': '1.3.1'}
    optimizer = {'state': {0: {'step': torch.tensor(3.)}}, 'param_groups': [{'lr': 3e-4}]}
    return {'meta': meta, 'state_dict': state_dict, 'optimizer': optimizer}


def saved_bytes(model, clips):
    "Bytes of the tensors autograd saves for backward during one forward pass of `model`, and that pass's scores."
    total = 0
    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): scores = model(clips)
    return total, scores


class CreatesFile:
    "An object whose unpickling opens, and so creates, a file: the smallest pickle that runs code when loaded."
    def __init__(self, path): self.path = path
    def __reduce__(self): return (io.open, (str(self.path), 'w'))


def touch_class_folder(root, clips:dict):
    "A folder of class folders holding empty files: `clips` maps each class to its file names; returns the folder."
    root = Path(root)
    for cls, names in clips.items():
        (root/cls).mkdir(parents=True, exist_ok=True)
        for name in names: (root/cls/name).touch()
    return root


def kinetics_checkpoint(classes:int=400, seed:int=0):
    """An official-layout checkpoint (as mmcv saves one) of a random swin3d_mini with a Kinetics head of `classes` classes:
    what a Kinetics backbone's file looks like, at the size of the tests."""
    from uas.backbone import swin3d_mini
    torch.manual_seed(seed)
    backbone = swin3d_mini()
    weights = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    weights.update({'cls_head.fc_cls.weight': torch.randn(classes, backbone.num_features) * 0.05,
                    'cls_head.fc_cls.bias': torch.randn(classes) * 0.05})
    return official_checkpoint(weights)
