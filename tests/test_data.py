"Tests of uas.data: annotation formats (the official ChimpBehave lists included), datasets over good and broken clips, loaders and check_dataset."

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
import uas.data
from helpers import write_broken, write_ramp
from uas.data import (AnnotationError, ClipError, ClipReader, ClipSampler, Skip, VideoDataset, check_dataset,
                      class_names, clip_seed, collate_clips, detect_format, make_loader, probe_clip, read_annotations,
                      read_class_names, without_problems)
from uas.video import get_pipeline, write_video

CB = ROOT/'tests'/'data'/'chimpbehave'/'annotations'

# ---------------------------------------------------------------- ChimpBehave's official lists
def cb(name): return read_annotations(CB/name, classes='chimpbehave', num_classes=7)

def test_chimpbehave_all_clips():
    every = cb('CB_OOD_all_cls.txt')
    assert (every.fmt, len(every), every.listed, every.skipped) == ('mmaction', 9187, 9187, [])
    assert every.label_counts().to_dict() == dict(sitting=7090, standing=993, walking=907, hanging=100, climbing_up=49,
                                                  climbing_down=23, running=25)
    assert all(e.path.startswith('../cropped_chimpBehave/') for e in every)

def test_chimpbehave_folds():
    every = {e.path.removeprefix('../cropped_chimpBehave/'): e.label for e in cb('CB_OOD_all_cls.txt')}
    tests = []
    for k in range(1, 6):
        train, test = cb(f'CB_train_cv{k}.txt'), cb(f'CB_test_cv{k}.txt')
        assert (len(train), len(test)) == (7352, 1835)
        train_paths, test_paths = {e.path for e in train}, {e.path for e in test}
        assert not train_paths & test_paths
        assert {e.path: e.label for e in [*train, *test]} == every  # each fold splits all 9,187 clips, labels unchanged
        tests.append(test_paths)
    for a in range(5):
        for b in range(a + 1, 5): assert not tests[a] & tests[b], (a, b)
    assert len(set().union(*tests)) == 9175

def test_chimpbehave_balanced_and_head_lists_parse():
    for name in sorted(p.name for p in CB.glob('*.txt')):
        ann = cb(name)
        assert ann.skipped == [] and len(ann) > 500, name

def test_chimpbehave_lists_name_no_clip_twice(caplog):
    "No official list repeats a clip: `duplicates='raise'` reads each, with the counts and no warning."
    counts = {}
    for name in sorted(p.name for p in CB.glob('*.txt')):
        ann = read_annotations(CB/name, classes='chimpbehave', duplicates='raise')
        assert ann.skipped == [] and len({e.path for e in ann}) == len(ann), name
        counts[name] = len(ann)
    assert not [r for r in caplog.records if r.name == 'uas.data']
    assert counts['CB_OOD_all_cls.txt'] == 9187 and counts['CB_OOD_head_cls.txt'] == 8990
    for k in range(1, 6):
        assert (counts[f'CB_train_cv{k}.txt'], counts[f'CB_test_cv{k}.txt']) == (7352, 1835)
        balanced = [counts[f'CB_{split}_cv{k}_head_cls_balanced.txt'] for split in ('train', 'test')]
        assert balanced == [2178, 543]

# ---------------------------------------------------------------- mmaction lists
def test_mmaction_paths_with_spaces_non_ascii_crlf_bom_tabs(tmp_path):
    lst = tmp_path/'list.txt'
    lst.write_bytes('\ufeffa b/c d.mp4 1\r\nüñï/é.mp4\t0\r\n\r\n  x.mp4   2  \r\n'.encode('utf-8'))
    ann = read_annotations(lst)
    assert [(e.path, e.label, e.where) for e in ann] == [('a b/c d.mp4', 1, f'{lst}:1'), ('üñï/é.mp4', 0, f'{lst}:2'),
                                                        ('x.mp4', 2, f'{lst}:4')]
    assert ann.classes == ['0', '1', '2'] and ann.root == tmp_path

def test_mmaction_bad_lines_named_with_file_and_line(tmp_path):
    lst = tmp_path/'bad.txt'
    lst.write_bytes(b'ok.mp4 0\nnolabel.mp4\nx.mp4 1.5\ny.mp4 -1\nz.mp4 3\nok.mp4 2\nbad\xff.mp4 1\nfine.mp4 1\nfine.mp4 1\n')
    with pytest.raises(AnnotationError) as e: read_annotations(lst, num_classes=3)
    msg = str(e.value)
    for no, text in [(2, 'expected "path label"'), (3, "label '1.5' is not an integer"), (4, 'label -1 out of range 0..2'),
                     (5, 'label 3 out of range 0..2'), (6, 'duplicate of line 1 (label 0, here 2)'), (7, 'not UTF-8')]:
        assert f'{lst}:{no}: {text}' in msg, (no, msg)
    assert '6 bad line(s)' in msg and f'{lst}:9' not in msg  # a clip listed again with the same label is not a bad line
    ann = read_annotations(lst, num_classes=3, on_error='skip')
    assert [e.path for e in ann] == ['ok.mp4', 'fine.mp4', 'fine.mp4']
    assert [int(s.where.rsplit(':', 1)[1]) for s in ann.skipped] == [2, 3, 4, 5, 6, 7]
    assert {s.status for s in ann.skipped} == {'bad entry'}
    assert len(ann) + len(ann.skipped) == ann.listed == 9

def test_duplicate_with_another_label_is_reported_as_such(tmp_path):
    (tmp_path/'l.txt').write_text('a.mp4 0\nb.mp4 1\na.mp4 1\n')
    ann = read_annotations(tmp_path/'l.txt', on_error='skip')
    assert [s.reason for s in ann.skipped] == ['duplicate of line 1 (label 0, here 1)']
    with pytest.raises(AnnotationError, match=r'l.txt:3: duplicate of line 1 \(label 0, here 1\)'):
        read_annotations(tmp_path/'l.txt')
    for mode in ('keep', 'drop', 'raise'):  # a contradiction, not a duplicate: `on_error` decides, not `duplicates`
        ann = read_annotations(tmp_path/'l.txt', on_error='skip', duplicates=mode)
        assert [e.where for e in ann] == [f'{tmp_path/"l.txt"}:1', f'{tmp_path/"l.txt"}:2'] and len(ann.skipped) == 1

# ---------------------------------------------------------------- a clip listed twice with the same label
def uas_warnings(caplog):
    "The messages of the warnings that the `uas.data` logger gave."
    return [r.getMessage() for r in caplog.records if r.name == 'uas.data' and r.levelno == logging.WARNING]

@pytest.fixture
def twice(tmp_path):
    "A list naming `a.mp4` on lines 1 and 3 and `c.mp4` on lines 2 and 5, with the same labels."
    (tmp_path/'l.txt').write_text('a.mp4 0\nc.mp4 1\na.mp4 0\nb.mp4 1\nc.mp4 1\n')
    return tmp_path/'l.txt'

def test_duplicates_are_kept_by_default_with_one_warning(twice, caplog):
    ann = read_annotations(twice)
    assert [(e.path, e.where) for e in ann] == [('a.mp4', f'{twice}:1'), ('c.mp4', f'{twice}:2'), ('a.mp4', f'{twice}:3'),
                                                ('b.mp4', f'{twice}:4'), ('c.mp4', f'{twice}:5')]
    assert ann.skipped == [] and ann.listed == 5 and ann.label_counts().tolist() == [2, 3]
    [msg] = uas_warnings(caplog)
    assert msg.startswith(f'{twice}: 2 line(s)') and 'line 3 repeats line 1, line 5 repeats line 2' in msg

def test_two_listings_read_two_entries_with_a_warning(tmp_path, caplog):
    (tmp_path/'l.txt').write_text('a.mp4 0\na.mp4 0\n')
    assert len(read_annotations(tmp_path/'l.txt')) == 2 and len(uas_warnings(caplog)) == 1
    assert len(read_annotations(tmp_path/'l.txt', duplicates='drop')) == 1

def test_drop_keeps_the_first_listing_and_reports_the_rest(twice, caplog):
    ann = read_annotations(twice, duplicates='drop')  # with on_error='raise': a dropped duplicate is not a bad line
    assert [e.where for e in ann] == [f'{twice}:1', f'{twice}:2', f'{twice}:4']
    assert ann.skipped == [Skip('a.mp4', f'{twice}:3', 'bad entry', 'duplicate of line 1'),
                           Skip('c.mp4', f'{twice}:5', 'bad entry', 'duplicate of line 2')]
    assert len(ann) + len(ann.skipped) == ann.listed == 5
    [msg] = uas_warnings(caplog)
    assert 'left out' in msg and 'line 3 repeats line 1' in msg

def test_drop_sorts_its_skips_among_the_bad_lines(tmp_path):
    (tmp_path/'l.txt').write_text('a.mp4 0\nb.mp4 x\na.mp4 0\nc.mp4 9\n')
    ann = read_annotations(tmp_path/'l.txt', num_classes=2, on_error='skip', duplicates='drop')
    assert [(s.where.rsplit(':', 1)[1], s.reason.split(',')[0]) for s in ann.skipped] == [
        ('2', "label 'x' is not an integer"), ('3', 'duplicate of line 1'), ('4', 'label 9 out of range 0..1')]
    assert ann.listed == 4

def test_raise_names_both_lines_of_each_duplicate(twice):
    with pytest.raises(AnnotationError) as e: read_annotations(twice, duplicates='raise')
    msg = str(e.value)
    assert msg.startswith(f'{twice}: 2 line(s) list a clip again with the same label')
    assert f'{twice}:3: duplicate of line 1' in msg and f'{twice}:5: duplicate of line 2' in msg

def test_many_duplicates_are_summarised(tmp_path, caplog):
    (tmp_path/'l.txt').write_text(''.join(f'c{i % 2}.mp4 0\n' for i in range(30)))
    assert len(read_annotations(tmp_path/'l.txt')) == 30
    [msg] = uas_warnings(caplog)
    assert msg.startswith(f'{tmp_path/"l.txt"}: 28 line(s)') and msg.endswith('line 7 repeats line 1 and 23 more')
    with pytest.raises(AnnotationError, match=r'28 line\(s\)[\s\S]*and 8 more'):
        read_annotations(tmp_path/'l.txt', duplicates='raise')

def test_mammalnet_duplicate_is_same_behaviour_and_animal(tmp_path, caplog):
    (tmp_path/'l.txt').write_text('a.mp4 1 7\nb.mp4 0 7\na.mp4 1 7\na.mp4 1 8\na.mp4 0 7\n')
    ann = read_annotations(tmp_path/'l.txt', on_error='skip')
    assert ann.fmt == 'mammalnet' and [e.where.rsplit(':', 1)[1] for e in ann] == ['1', '2', '3']
    assert [s.reason for s in ann.skipped] == ['duplicate of line 1 (animal 7, here 8)',
                                               'duplicate of line 1 (label 1, here 0)']
    assert len(uas_warnings(caplog)) == 1
    dropped = read_annotations(tmp_path/'l.txt', on_error='skip', duplicates='drop')
    assert [e.where.rsplit(':', 1)[1] for e in dropped] == ['1', '2']

def test_a_folder_has_no_duplicates(tmp_path, caplog):
    for p in ('x/a.mp4', 'y/a.mp4'):
        (tmp_path/p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path/p).write_bytes(b'x')
    assert len(read_annotations(tmp_path, duplicates='raise')) == 2 and not uas_warnings(caplog)

def test_many_bad_lines_are_summarised(tmp_path):
    (tmp_path/'l.txt').write_text('good.mp4 0\n' + ''.join(f'c{i}.mp4 x\n' for i in range(30)))
    with pytest.raises(AnnotationError, match=r'30 bad line\(s\)[\s\S]*and 10 more'): read_annotations(tmp_path/'l.txt')

def test_no_usable_clip_is_an_error_in_both_modes(tmp_path):
    (tmp_path/'l.txt').write_text('a.mp4 x\n')
    with pytest.raises(AnnotationError, match='no usable clips'): read_annotations(tmp_path/'l.txt', on_error='skip')
    (tmp_path/'empty.txt').write_text('')
    with pytest.raises(AnnotationError, match='no usable clips'): read_annotations(tmp_path/'empty.txt')

def test_class_names_and_num_classes_must_agree(tmp_path):
    (tmp_path/'l.txt').write_text('a.mp4 0\n')
    with pytest.raises(AnnotationError, match='7 class names given for num_classes=3'):
        read_annotations(tmp_path/'l.txt', classes='chimpbehave', num_classes=3)
    (tmp_path/'names.txt').write_text('jump\nrun\n')
    assert read_annotations(tmp_path/'l.txt', classes=tmp_path/'names.txt').classes == ['jump', 'run']
    with pytest.raises(AnnotationError, match='repeat'): class_names(['a', 'a'])

def test_bad_arguments(tmp_path):
    (tmp_path/'l.txt').write_text('a.mp4 0\n')
    with pytest.raises(ValueError, match='on_error'): read_annotations(tmp_path/'l.txt', on_error='ignore')
    with pytest.raises(ValueError, match="duplicates must be 'keep', 'drop' or 'raise'"):
        read_annotations(tmp_path/'l.txt', duplicates='skip')
    with pytest.raises(ValueError, match='unknown annotation format'): read_annotations(tmp_path/'l.txt', fmt='csv')
    with pytest.raises(FileNotFoundError, match='nowhere'): read_annotations(tmp_path/'nowhere.txt')
    write_video(tmp_path/'v.mp4', np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(AnnotationError, match='is a video, not an annotation list'): read_annotations(tmp_path/'v.mp4')

# ---------------------------------------------------------------- MammalNet lists and class maps
def test_mammalnet_list_with_behaviour_map(tmp_path):
    (tmp_path/'annotation').mkdir()
    (tmp_path/'annotation'/'behavior_to_id.txt').write_text('hunting 1\ngrooming 0\nsleeping 2\n')
    (tmp_path/'lists').mkdir()
    lst = tmp_path/'lists'/'train_base.txt'
    lst.write_text('trimmed video/a b.mp4 1 140\nc.mp4 2 7\nd.mp4 5 7\ne.mp4 0 x1\n')
    assert detect_format(lst) == 'mammalnet'
    ann = read_annotations(lst, on_error='skip')
    assert ann.fmt == 'mammalnet' and ann.classes == ['grooming', 'hunting', 'sleeping']
    assert [(e.path, e.label, e.animal) for e in ann] == [('trimmed video/a b.mp4', 1, 140), ('c.mp4', 2, 7)]
    assert [(s.where.rsplit(':', 1)[1], s.reason.split(',')[0]) for s in ann.skipped] == [
        ('3', 'label 5 out of range 0..2'), ('4', "animal id 'x1' is not an integer")]

def test_mammalnet_without_map_names_classes_by_id(tmp_path):
    (tmp_path/'l.txt').write_text('a.mp4 3 1\nb.mp4 0 2\n')
    ann = read_annotations(tmp_path/'l.txt')
    assert ann.fmt == 'mammalnet' and ann.classes == ['0', '1', '2', '3']
    assert read_annotations(tmp_path/'l.txt', num_classes=12).classes == [str(i) for i in range(12)]
    assert read_annotations(tmp_path/'l.txt', fmt='mmaction').entries[0].path == 'a.mp4 3'

def test_class_map_files(tmp_path):
    (tmp_path/'a.json').write_text('{"0": "hunting", "1": "grooming"}')
    assert read_class_names(tmp_path/'a.json') == ['hunting', 'grooming']
    (tmp_path/'b.json').write_text('["x", "y"]')
    assert read_class_names(tmp_path/'b.json') == ['x', 'y']
    (tmp_path/'dup.txt').write_text('a 0\nb 0\n')
    with pytest.raises(AnnotationError, match="id 0 is given to both 'a' and 'b'"): read_class_names(tmp_path/'dup.txt')

# ---------------------------------------------------------------- folders of class folders
def test_folder_layout_and_what_it_leaves_out(tmp_path):
    root = tmp_path/'clips'
    for p in ('zebra/z.mp4', 'ape/cam 1/ü.MP4', 'ape/a.gif', 'Bear/b.mkv'): (root/p).parent.mkdir(parents=True, exist_ok=True); (root/p).write_bytes(b'x')
    (root/'ape'/'notes.txt').write_text('x')
    (root/'ape'/'README').write_text('x')
    (root/'stray.mp4').write_bytes(b'x')
    (root/'.ipynb_checkpoints').mkdir()
    (root/'empty_class').mkdir()
    ann = read_annotations(root)
    assert ann.fmt == 'folder' and ann.classes == ['Bear', 'ape', 'empty_class', 'zebra']
    assert [(e.path, e.label) for e in ann] == [('Bear/b.mkv', 0), ('ape/a.gif', 1), ('ape/cam 1/ü.MP4', 1), ('zebra/z.mp4', 3)]
    reasons = {s.path: s.reason for s in ann.skipped}
    assert reasons.keys() == {'.ipynb_checkpoints', 'stray.mp4', 'ape/README', 'ape/notes.txt'}
    assert reasons['.ipynb_checkpoints'] == 'hidden folder' and reasons['stray.mp4'] == 'not in a class folder'
    assert reasons['ape/notes.txt'].startswith('not a video file (.txt;') and reasons['ape/README'].startswith('not a video file (no extension')
    assert ann.label_counts().to_dict() == {'Bear': 1, 'ape': 2, 'empty_class': 0, 'zebra': 1}
    fixed = read_annotations(root, classes=['zebra', 'ape'])
    assert [(e.path, e.label) for e in fixed] == [('ape/a.gif', 1), ('ape/cam 1/ü.MP4', 1), ('zebra/z.mp4', 0)]
    assert [s.path for s in fixed.skipped if 'is not one of the classes' in s.reason] == ['Bear/b.mkv']

# ---------------------------------------------------------------- datasets over good and broken clips
SMALL = dict(clip_len=4, short_side=32, crop_size=32)

@pytest.fixture
def mixed(tmp_path):
    "A class folder with three good clips and the broken files; (root, good relative paths, broken relative paths)."
    root = tmp_path/'clips'
    good = ['run/a.mp4', 'run/b é x.mp4', 'sit/c.mp4', 'sit/d.mp4']
    for g in good: write_ramp(root/g)
    bad = [p.relative_to(root).as_posix() for p in write_broken(root/'sit')]
    return root, good, bad

def test_skip_run_yields_every_good_clip_and_reports_every_broken_one(mixed, tmp_path):
    root, good, bad = mixed
    (root/'sit'/'notes.txt').write_text('x')
    ds = VideoDataset(root, pipeline=get_pipeline('chimpbehave_val', **SMALL), on_error='skip', work_dir=tmp_path/'work')
    items = [ds[i] for i in range(len(ds))]
    ok = [it for it in items if isinstance(it, dict)]
    assert sorted(ds.annotations[it['index']].path for it in ok) == sorted(good)
    assert all(it['clip'].shape == (1, 3, 4, 32, 32) and it['clip'].dtype == torch.float32 for it in ok)
    assert {ds.annotations[it['index']].path: it['label'] for it in ok} == {'run/a.mp4': 0, 'run/b é x.mp4': 0, 'sit/c.mp4': 1, 'sit/d.mp4': 1}
    report = pd.read_csv(ds.write_skip_report(), keep_default_na=False)
    assert (tmp_path/'work'/'skipped_clips.csv').exists()
    rows = {r.path: r for r in report.itertuples()}
    assert rows.keys() == set(bad) | {'sit/notes.txt'}
    assert rows['sit/empty.mp4'].status == 'unreadable' and '0 bytes' in rows['sit/empty.mp4'].reason
    assert rows['sit/text.mp4'].status == 'unreadable' and rows['sit/cut.mp4'].status == 'unreadable'
    assert rows['sit/notes.txt'].status == 'bad entry' and rows['sit/notes.txt'].reason.startswith('not a video file')
    assert len(ok) + len(report) == ds.annotations.listed == 8
    again = ds[ds.annotations.entries.index(next(e for e in ds.annotations if e.path == 'sit/text.mp4'))]
    assert isinstance(again, Skip) and len(ds.skip_report()) == 4  # recorded once, however often it is met

def test_raise_run_over_a_list_stops_at_the_first_bad_clip(mixed, tmp_path):
    root, good, bad = mixed
    lst = tmp_path/'val.txt'
    order = [good[0], bad[1], good[1], bad[0]]
    lst.write_text(''.join(f'clips/{p} {int(p.startswith("sit"))}\n' for p in order))
    ds = VideoDataset(lst, pipeline=get_pipeline('chimpbehave_val', **SMALL))
    assert ds[0]['label'] == 0
    with pytest.raises(ClipError, match=rf"{lst}:2: clip 'clips/{bad[1]}' is unreadable"): ds[1]
    with pytest.raises(ClipError) as e: [ds[i] for i in range(len(ds))]
    assert f'{lst}:2' in str(e.value)

def test_missing_clip_in_a_list(mixed, tmp_path):
    root, good, _ = mixed
    (tmp_path/'l.txt').write_text(f'{good[0]} 0\ngone.mp4 1\n')
    pipeline = get_pipeline('chimpbehave_val', **SMALL)
    with pytest.raises(ClipError, match=r"l.txt:2: clip 'gone.mp4' is missing"): VideoDataset(tmp_path/'l.txt', root, pipeline)[1]
    ds = VideoDataset(tmp_path/'l.txt', data_prefix=root, pipeline=pipeline, on_error='skip')
    assert isinstance(ds[0], dict) and ds[1] == Skip('gone.mp4', f'{tmp_path/"l.txt"}:2', 'missing', 'no such file', 1)

def test_bad_lines_are_raised_or_reported_by_the_dataset(mixed, tmp_path):
    root, good, _ = mixed
    (tmp_path/'l.txt').write_text(f'{good[0]} 0\n{good[1]} seven\n')
    pipeline = get_pipeline('chimpbehave_val', **SMALL)
    with pytest.raises(AnnotationError, match='l.txt:2'): VideoDataset(tmp_path/'l.txt', root, pipeline)
    ds = VideoDataset(tmp_path/'l.txt', root, pipeline, on_error='skip')
    assert len(ds) == 1 and ds.skip_report()['where'].tolist() == [f'{tmp_path/"l.txt"}:2']

def test_dataset_needs_a_pipeline_and_a_policy(mixed):
    root = mixed[0]
    with pytest.raises(ValueError, match='needs a pipeline'): VideoDataset(root)
    with pytest.raises(ValueError, match='on_error'): VideoDataset(root, pipeline='chimpbehave_val', on_error='warn')
    with pytest.raises(KeyError, match='unknown pipeline'): VideoDataset(root, pipeline='chimpbehave_nope')

def test_named_pipeline_and_seeded_items(mixed):
    ds = VideoDataset(mixed[0], pipeline='chimpbehave_train')  # the paper's pipeline by name: 224x224 views
    assert ds[0]['clip'].shape == (1, 3, 32, 224, 224)
    small = VideoDataset(mixed[0], pipeline=get_pipeline('chimpbehave_train', **SMALL))
    assert torch.equal(small[(0, 5)]['clip'], small[(0, 5)]['clip'])
    assert not all(torch.equal(small[(0, 5)]['clip'], small[(0, s)]['clip']) for s in range(6, 12))

# ---------------------------------------------------------------- loaders
def test_sampler_and_collate():
    s = ClipSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == [(i, 0) for i in range(10)] and list(ClipSampler(10, seed=3)) == first
    s.set_epoch(1)
    assert list(s) != first
    shards = [list(ClipSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(first) and [len(x) for x in shards] == [4, 3, 3]
    assert len(ClipSampler(10, rank=2, world_size=3)) == 3
    batch = collate_clips([Skip('a', 'l:1', 'missing', 'no such file', 0)])
    assert batch['clip'].numel() == 0 and batch['label'].tolist() == [] and len(batch['skipped']) == 1

def test_loader_with_workers_reports_every_skip_and_matches_one_process(mixed, tmp_path):
    root, good, bad = mixed
    pipeline = get_pipeline('chimpbehave_train', **SMALL)
    ds = VideoDataset(root, pipeline=pipeline, on_error='skip', work_dir=tmp_path/'w')
    loader = make_loader(ds, batch_size=3, num_workers=2, seed=7)
    batches = list(loader)
    assert ds.load_skips.keys() == {i for i, e in enumerate(ds.annotations) if e.path in bad}  # recorded in the main process
    assert sorted(pd.read_csv(tmp_path/'w'/'skipped_clips.csv').path) == sorted(bad)
    seen = [i for b in batches for i in b['index'].tolist()]
    assert sorted(ds.annotations[i].path for i in seen) == sorted(good)
    assert all(b['clip'].shape[1:] == (1, 3, 4, 32, 32) and len(b['label']) == len(b['clip']) for b in batches)
    one = VideoDataset(root, pipeline=pipeline, on_error='skip')
    single = list(make_loader(one, batch_size=3, num_workers=0, seed=7))
    assert [b['index'].tolist() for b in single] == [b['index'].tolist() for b in batches]
    assert torch.equal(torch.cat([b['clip'] for b in single]), torch.cat([b['clip'] for b in batches]))
    assert loader.epoch == 1
    epoch1 = list(loader)
    assert [b['index'].tolist() for b in epoch1] != [b['index'].tolist() for b in batches]
    loader.set_epoch(0)
    assert torch.equal(torch.cat([b['clip'] for b in loader]), torch.cat([b['clip'] for b in batches]))

def test_test_mode_keeps_views_together_in_list_order(mixed):
    root, good, _ = mixed
    ds = VideoDataset(root, pipeline=get_pipeline('mammalnet_test', clip_len=2, frame_interval=1, num_clips=2, short_side=24,
                                                    crop_size=24), on_error='skip')
    batches = list(make_loader(ds, batch_size=2, test_mode=True, pin_memory=torch.cuda.is_available()))
    assert [b['index'].tolist() for b in batches] == [[0, 1], [2], [4]]  # sorted paths; 3, 5 and 6 are broken
    assert [tuple(b['clip'].shape) for b in batches] == [(2, 6, 3, 2, 24, 24)] + [(1, 6, 3, 2, 24, 24)] * 2  # 2 clips x 3 crops
    if torch.cuda.is_available(): assert all(batches[0][k].is_pinned() for k in ('clip', 'label', 'index'))

def test_train_mode_keeps_views_together_too(mixed):
    "One rule for views: a clip is one sample, its views together, in training as in testing."
    ds = VideoDataset(mixed[0], pipeline=get_pipeline('chimpbehave_test', **SMALL), on_error='skip')
    batch = next(iter(make_loader(ds, batch_size=2, shuffle=False, num_workers=1)))
    assert batch['clip'].shape == (2, 3, 3, 4, 32, 32) and batch['label'].tolist() == [0, 0]
    assert batch['index'].tolist() == [0, 1] and batch['draw'].tolist() == [0, 0]
    assert collate_clips([{'clip': torch.zeros(3, 3, 2, 4, 4), 'label': 1, 'index': 0}], spread_views=True)['label'].tolist() == [1] * 3


def test_a_clip_gets_the_same_draw_in_any_process_worker_or_rank(mixed):
    "The augmentation of (seed, clip, draw) is the same in the main process, in a loader worker and on either of 2 ranks."
    ds = VideoDataset(mixed[0], pipeline=get_pipeline('chimpbehave_train', **SMALL), on_error='skip')
    def clips(loader, epoch=1):
        loader.set_epoch(epoch)
        return {i: c for b in loader for i, c in zip(b['index'].tolist(), b['clip'])}
    main = clips(make_loader(ds, batch_size=2, seed=5))
    worker = clips(make_loader(ds, batch_size=2, seed=5, num_workers=1))
    ranks = [clips(make_loader(ds, batch_size=2, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(main) == sorted(worker) == sorted(ranks[0] | ranks[1]) and not ranks[0].keys() & ranks[1].keys()
    for i in main:
        assert torch.equal(main[i], worker[i]) and torch.equal(main[i], (ranks[0] | ranks[1])[i])
        assert torch.equal(main[i], ClipReader(ds, seed=5)[i, 1]['clip'])  # read alone: draw 1 is epoch 1's
    other = clips(make_loader(ds, batch_size=2, seed=5), epoch=2)
    assert any(not torch.equal(main[i], other[i]) for i in main)  # another epoch, another draw


def test_evaluation_over_ranks_counts_each_clip_once(mixed):
    ds = VideoDataset(mixed[0], pipeline=get_pipeline('chimpbehave_val', **SMALL), on_error='skip')
    shares = [[i for b in make_loader(ds, test_mode=True, rank=r, world_size=3) for i in b['index'].tolist()] for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(i for b in make_loader(ds, test_mode=True) for i in b['index'].tolist())

# ---------------------------------------------------------------- check_dataset
def test_check_dataset_finds_what_the_skip_run_skips(mixed, tmp_path):
    root, good, bad = mixed
    (root/'sit'/'notes.txt').write_text('x')
    ds = VideoDataset(root, pipeline=get_pipeline('chimpbehave_val', **SMALL), on_error='skip')
    list(make_loader(ds, batch_size=2))
    summary = check_dataset(root, num_workers=2, progress=True)
    problems = summary.attrs['problems']
    assert sorted(problems.path) == sorted(ds.skip_report().path)
    assert dict(zip(problems.path, problems.status)) == dict(zip(ds.skip_report().path, ds.skip_report().status))
    assert summary.index.tolist() == ['run', 'sit', 'total']
    assert summary.loc['run'].to_dict() == dict(listed=2, ok=2, missing=0, unreadable=0, too_short=0, bad_entry=0,
                                                duplicate=0, frames_min=8, frames_median=8, frames_max=8)
    assert summary.loc['sit', ['listed', 'ok', 'unreadable']].tolist() == [5, 2, 3]
    assert summary.loc['total', ['listed', 'ok', 'unreadable', 'bad_entry']].tolist() == [8, 4, 3, 1]
    cols = ['ok', 'missing', 'unreadable', 'too_short', 'bad_entry']
    assert summary.loc['total', cols].sum() == summary.loc['total', 'listed']

def test_check_dataset_of_a_list_missing_short_and_bad_lines(mixed, tmp_path):
    root, good, _ = mixed
    write_ramp(root/'short.mp4', n=3)
    (tmp_path/'l.txt').write_text(f'{good[0]} 0\nshort.mp4 1\ngone.mp4 1\n{good[2]} x\n')
    summary = check_dataset(tmp_path/'l.txt', data_prefix=root, min_frames=4, classes=['run', 'sit'])
    assert summary.loc['sit', ['listed', 'ok', 'missing', 'too_short']].tolist() == [2, 0, 1, 1]
    assert summary.loc['total', ['listed', 'bad_entry']].tolist() == [4, 1]
    assert summary.attrs['problems'].status.tolist() == ['bad entry', 'too short', 'missing']
    assert probe_clip(root/'short.mp4', min_frames=4) == ('too short', 3, '3 frames, fewer than 4')

def test_check_dataset_reports_duplicates(mixed, tmp_path, monkeypatch):
    root, good, bad = mixed
    (tmp_path/'l.txt').write_text(f'{good[0]} 0\n{bad[0]} 1\n{good[0]} 0\n{bad[0]} 1\n{good[2]} 1\n')
    probed = []
    inspect = uas.data.inspect_clip
    monkeypatch.setattr(uas.data, 'inspect_clip', lambda path, *a, **kw: probed.append(path) or inspect(path, *a, **kw))
    summary = check_dataset(tmp_path/'l.txt', data_prefix=root, classes=['run', 'sit'])
    assert sorted(probed) == sorted({root/good[0], root/bad[0], root/good[2]})  # each file once, however often listed
    assert summary.loc['run', ['listed', 'ok', 'duplicate']].tolist() == [2, 2, 1]
    assert summary.loc['sit', ['listed', 'ok', 'unreadable', 'duplicate']].tolist() == [3, 1, 2, 1]
    assert summary.loc['total', ['listed', 'ok', 'unreadable', 'bad_entry', 'duplicate']].tolist() == [5, 3, 2, 0, 2]
    lst = tmp_path/'l.txt'
    assert summary.attrs['duplicates'].values.tolist() == [[good[0], f'{lst}:3', f'{lst}:1'],
                                                           [bad[0], f'{lst}:4', f'{lst}:2']]
    assert summary.attrs['problems']['where'].tolist() == [f'{lst}:2', f'{lst}:4']  # one problem per listing
    dropped = check_dataset(tmp_path/'l.txt', data_prefix=root, classes=['run', 'sit'], duplicates='drop')
    assert dropped.loc['total', ['listed', 'ok', 'unreadable', 'bad_entry', 'duplicate']].tolist() == [5, 2, 1, 2, 0]
    assert dropped.attrs['duplicates'].empty
    assert set(dropped.attrs['problems'].reason) >= {'duplicate of line 1', 'duplicate of line 2'}

def test_a_clip_listed_twice_is_loaded_twice_and_reported_per_line(mixed, tmp_path):
    root, good, bad = mixed
    lst = tmp_path/'l.txt'
    lst.write_text(f'{good[0]} 0\n{bad[0]} 1\n{good[0]} 0\n{bad[0]} 1\n{good[2]} 1\n')
    ds = VideoDataset(lst, root, get_pipeline('chimpbehave_train', **SMALL), on_error='skip', work_dir=tmp_path/'w')
    assert len(ds) == 5
    for epoch in range(2):
        loader = make_loader(ds, batch_size=2, num_workers=1, seed=3)
        loader.set_epoch(epoch)
        seen = sorted(i for b in loader for i in b['index'].tolist())
        assert seen == [0, 2, 4]  # both listings of good[0], every epoch
    report = pd.read_csv(tmp_path/'w'/'skipped_l.csv')
    assert report['where'].tolist() == [f'{lst}:2', f'{lst}:4'] and report['index'].tolist() == [1, 3]
    assert clip_seed(3, 0, 0) != clip_seed(3, 2, 0)  # the augmentation seed each listing gets in epoch 0
    a, b = ds[0, clip_seed(3, 0, 0)]['clip'], ds[2, clip_seed(3, 2, 0)]['clip']  # the same file, each listing with its own draw
    assert a.shape == b.shape and not torch.equal(a, b)
    clean = without_problems(ds.annotations, check_dataset(ds))
    assert [e.where for e in clean] == [f'{lst}:1', f'{lst}:3', f'{lst}:5'] and clean.listed == 5

def test_raise_mode_in_a_worker_names_the_line(mixed, tmp_path):
    root, good, bad = mixed
    (tmp_path/'l.txt').write_text(f'{good[0]} 0\n{bad[0]} 1\n')
    ds = VideoDataset(tmp_path/'l.txt', root, get_pipeline('chimpbehave_val', **SMALL))
    with pytest.raises(ClipError, match=rf"l.txt:2: clip '{bad[0]}' is unreadable"): list(make_loader(ds, num_workers=1, test_mode=True))

def test_distributed_ranks_write_their_own_reports(mixed, tmp_path):
    root, good, bad = mixed
    pipeline = get_pipeline('chimpbehave_val', **SMALL)
    skipped = []
    for rank in (0, 1):
        ds = VideoDataset(root, pipeline=pipeline, on_error='skip', work_dir=tmp_path)
        seen = [i for b in make_loader(ds, batch_size=2, rank=rank, world_size=2) for i in b['index'].tolist()]
        skipped += pd.read_csv(tmp_path/f'skipped_clips_rank{rank}.csv').path.tolist()
        assert not set(seen) & ds.load_skips.keys()
    assert sorted(skipped) == sorted(bad)

def test_a_checked_run_starts_clean_and_still_reports(mixed, tmp_path):
    root, good, bad = mixed
    ann = read_annotations(root)
    clean = without_problems(ann, check_dataset(ann))
    assert sorted(e.path for e in clean) == sorted(good) and clean.listed == ann.listed
    ds = VideoDataset(clean, pipeline=get_pipeline('chimpbehave_val', **SMALL), on_error='raise', work_dir=tmp_path)
    assert [len(b['index']) for b in make_loader(ds, batch_size=2)] == [2, 2]
    report = pd.read_csv(tmp_path/'skipped_clips.csv')
    assert sorted(report.path) == sorted(bad) and set(report.status) == {'unreadable'}

def faststart_clip(path, n=16, size=32):
    "An h264 mp4 with its index (moov) at the front, so that a truncated copy still opens."
    import av
    with av.open(str(path), 'w', options={'movflags': 'faststart'}) as out:
        stream = out.add_stream('libx264', rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = 'yuv420p'
        for t in range(n): out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), 10*t, np.uint8), format='rgb24')))
        out.mux(stream.encode())
    return path

def test_check_flags_every_file_a_run_skips_among_damaged_files(tmp_path):
    root = tmp_path/'clips'/'sit'
    root.mkdir(parents=True)
    data = faststart_clip(tmp_path/'whole.mp4').read_bytes()
    rng = np.random.default_rng(0)
    for frac in (0.5, 0.7, 0.8, 0.9, 0.95):
        (root/f'cut{frac}.mp4').write_bytes(data[:int(len(data)*frac)])
        (root/f'noise{frac}.mp4').write_bytes(data[:int(len(data)*frac)] + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root/'garbage_after_header.mp4').write_bytes(data[:64] + rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())
    ann = read_annotations(tmp_path/'clips')
    flagged = set(check_dataset(ann, min_frames=16).attrs['problems'].path)
    assert 'sit/garbage_after_header.mp4' in flagged and len(flagged) == len(ann)  # every copy lost frames or is garbage
    for name in ('chimpbehave_train', 'chimpbehave_val'):
        for seed in range(3):
            ds = VideoDataset(ann, pipeline=get_pipeline(name, **SMALL), on_error='skip')
            assert sum(len(b['index']) for b in make_loader(ds, batch_size=4, seed=seed)) + len(ds.load_skips) == len(ds)
            assert set(ds.skip_report().path) <= flagged  # a run skips nothing that the check lets through
