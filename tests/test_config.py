"Presets against the paper's values, the reference README's --cfg-options, YAML configs, and the `uas_split` / `uas_check` commands."
import json, subprocess, sys
from pathlib import Path

import pytest
from fastcore.script import anno_parser
from helpers import touch_class_folder, write_broken, write_ramp

from uas.config import (PRESETS, SPLITS, ConfigError, build_model, check_config, checkpoint_source, config_classes, load_config,
                        uas_check, uas_split)
from uas.model import count_parameters

BIN = Path(sys.executable).parent
K = 'checkpoints/swin_base_patch244_window877_kinetics{}_22k.pth'

# The paper's configurations (its reference's config files and README): classes, clip length, frame interval of the
# train / val / test pipelines, test views, lr, weight decay, epochs, videos_per_gpu, update interval, micro-batch, mode,
# pretrained weights.
FACTS = {
    'mammalnet_k400': (12, 32, (2, 2, 2), 12, 3e-4, 0.05, 30, 8, 8, 1, 'uas', K.format(400)),
    'mammalnet_k600': (12, 32, (2, 2, 2), 12, 3e-4, 0.05, 30, 8, 8, 1, 'uas', K.format(600)),
    'chimpbehave_k400': (7, 32, (1, 1, 2), 3, 3e-4, 0.05, 30, 16, 8, 2, 'uas', K.format(400)),
    'chimpbehave_k600': (7, 32, (1, 1, 2), 3, 3e-4, 0.05, 30, 16, 8, 2, 'uas', K.format(600)),
    'chimpbehave_k700': (7, 32, (1, 1, 2), 3, 3e-4, 0.05, 30, 16, 8, 2, 'uas', K.format(700)),
    'k700diff_k600': (103, 32, (2, 2, 2), 12, 3e-4, 0.05, 30, 8, 8, 1, 'uas', K.format(600)),
    'k700diff_k600_lora': (103, 32, (2, 2, 2), 12, 3e-4, 0.05, 30, 8, 8, 1, 'lora', K.format(600)),
    'k700diff_k600_full': (103, 32, (2, 2, 2), 12, 3e-4, 0.05, 30, 8, 8, 1, 'full', K.format(600)),
    'synthetic_mini': (7, 8, (1, 1, 2), 3, 3e-4, 0.05, 10, 8, 1, 8, 'uas', None),
}

def resolved(cfg):
    train, val, test = (getattr(cfg.data, s).build_pipeline() for s in SPLITS)
    assert train.clip_len == val.clip_len == test.clip_len
    return (cfg.model.cls_head.num_classes, train.clip_len, (train.frame_interval, val.frame_interval, test.frame_interval),
            test.views, cfg.train.lr, cfg.train.weight_decay, cfg.train.epochs, cfg.train.batch_size, cfg.train.update_interval,
            cfg.train.micro_batch, cfg.mode, cfg.load_from)

@pytest.mark.parametrize('name', list(FACTS))
def test_preset_values(name):
    assert resolved(load_config(name)) == FACTS[name]

def test_every_preset_is_tested():
    assert set(PRESETS) == set(FACTS)

def test_preset_details():
    chimp, lora, mini = load_config('chimpbehave_k400'), load_config('k700diff_k600_lora'), load_config('synthetic_mini')
    assert chimp.data.classes == 'chimpbehave' and chimp.data.test.ann_file == chimp.data.val.ann_file == 'data/chimpbehave/chimpbehave_val.txt'
    assert chimp.data.train.data_prefix == 'data/chimpbehave/miniclips' and chimp.train.val_interval == 5 and chimp.train.checkpoint_interval == 1
    assert (lora.model.backbone.lora_rank, lora.model.backbone.lora_alpha, lora.model.backbone.lora_targets) == (32, None, 'qv')
    assert load_config('mammalnet_k400').data.test.ann_file == 'data/mammalnet/test_base.txt'
    assert (mini.model.backbone.arch, mini.train.cached, mini.train.amp) == ('swin3d_mini', True, 'no')
    assert not load_config('chimpbehave_k700').train.cached and load_config('chimpbehave_k700').train.amp == 'fp16'

REF = 'configs/recognition/swin/swin_base_patch244_window877_{}.py'

@pytest.mark.parametrize('ref,preset', [('mammalnet_k400', 'mammalnet_k400'), ('mammalnet_k600', 'mammalnet_k600'),
    ('chimpBehave_k400', 'chimpbehave_k400'), ('chimpBehave_k600', 'chimpbehave_k600'), ('chimpBehave_k700', 'chimpbehave_k700'),
    ('kinetics700_diff_k600', 'k700diff_k600'), ('kinetics700_diff_k600_lora', 'k700diff_k600_lora')])
def test_reference_config_paths(ref, preset):
    assert load_config(REF.format(ref)) == load_config(preset)

def test_readme_uas_from_k400():
    cfg = load_config(REF.format('mammalnet_k400'), ['freeze_backbone=True', f'load_from={K.format(400)}'])
    assert (cfg.mode, cfg.load_from, cfg.model.cls_head.num_classes) == ('uas', K.format(400), 12)

def test_readme_lora_r32_alpha32():
    cfg = load_config('k700diff_k600', ['freeze_backbone=True', f'load_from={K.format(600)}', 'model.backbone.use_lora=True',
                                        'model.backbone.lora_rank=32', 'model.backbone.lora_alpha=32', 'load_from=null'])
    assert (cfg.mode, cfg.model.backbone.lora_rank, cfg.model.backbone.lora_alpha) == ('lora', 32, 32.0)
    assert count_parameters(build_model(cfg))[1] == 1_645_671  # the paper's LoRA row: adapters on q and v of 24 blocks + head

def test_key_and_type_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'model.backbone.lora_rnak'; closest valid keys: model.backbone.lora_rank"):
        load_config('chimpbehave_k400', ['model.backbone.lora_rnak=8'])
    with pytest.raises(ConfigError, match=r"total_epochs='abc': expected Integer"):
        load_config('chimpbehave_k400', ['total_epochs=abc'])
    with pytest.raises(ConfigError, match=r'model.backbone.use_lora=True with freeze_backbone=False'):
        load_config('k700diff_k600_full', ['model.backbone.use_lora=True'])
    with pytest.raises(ConfigError, match=r'must be a positive multiple'):
        load_config('chimpbehave_k400', ['data.videos_per_gpu=12'])
    with pytest.raises(ConfigError, match=r"closest valid keys: optimizer.lr"):
        load_config('chimpbehave_k400', ['optimizer.lrr=1'])

def test_yaml_with_base(tmp_path):
    (tmp_path/'base.yaml').write_text('_base_: chimpbehave_k400\ntotal_epochs: 12\nmodel:\n  backbone: {use_lora: true, lora_rank: 8}\n')
    (tmp_path/'lab.yaml').write_text('_base_: [base.yaml]\nmodel.cls_head.num_classes: 5\ndata: {classes: null, videos_per_gpu: 8}\n'
                                     'train: {seed: 3}\namp: bf16\n')
    cfg = load_config(tmp_path/'lab.yaml', ['optimizer.lr=1e-4'])
    assert (cfg.mode, cfg.model.backbone.lora_rank, cfg.train.epochs, cfg.model.cls_head.num_classes) == ('lora', 8, 12, 5)
    assert (cfg.train.micro_batch, cfg.train.seed, cfg.train.amp, cfg.train.lr) == (1, 3, 'bf16', 1e-4)
    assert cfg.data.train.pipeline == 'chimpbehave_train' and cfg.load_from == K.format(400)
    (tmp_path/'bad.yaml').write_text('_base_: lab.yaml\ntrain: {epochs: many}\n')
    with pytest.raises(ConfigError, match=r"bad.yaml: train.epochs='many': expected Integer"): load_config(tmp_path/'bad.yaml')

def test_load_from_registry_file_downloads_into_cache(tmp_path, monkeypatch):
    release = tmp_path/'release'/'Pre-train'
    release.mkdir(parents=True)
    (release/'swin_base_patch244_window877_kinetics400_22k.pth').write_bytes(b'weights')
    monkeypatch.setenv('UAS_DOWNLOAD_BASE', str(tmp_path/'release'))
    monkeypatch.setenv('UAS_CACHE_DIR', str(tmp_path/'cache'))
    monkeypatch.chdir(tmp_path)
    got = checkpoint_source(K.format(400), progress=False)
    assert got == tmp_path/'cache'/'swin_base_patch244_window877_kinetics400_22k.pth' and got.read_bytes() == b'weights'
    assert checkpoint_source('k400', progress=False) == got
    (tmp_path/'checkpoints').mkdir()
    (tmp_path/'checkpoints'/'swin_base_patch244_window877_kinetics400_22k.pth').write_bytes(b'mine')
    assert checkpoint_source(K.format(400)).read_bytes() == b'mine'  # a file that is there is used as it is

def run(*args, cwd=None):
    return subprocess.run([str(BIN/args[0]), *map(str, args[1:])], capture_output=True, text=True, cwd=cwd, timeout=300)

def test_uas_split_groups_are_disjoint(tmp_path):
    animals = ['ana', 'bo', 'cy', 'dee', 'eli', 'fay', 'gus', 'hal']
    folder = touch_class_folder(tmp_path/'lab', {c: [f'{a}_day{d}_{i}.mp4' for a in animals for d in (1, 2) for i in range(n)]
                                                 for c, n in [('sitting', 3), ('walking', 1), ('climbing', 1)]})
    res = run('uas_split', folder, '--group', r'^([a-z]+)_', '--seed', 7)
    assert res.returncode == 0, res.stderr
    record = json.loads((tmp_path/'lab_splits'/'split.json').read_text())
    assert record['seed'] == 7 and record['group'] == r'^([a-z]+)_'
    groups = {s: {line.split('/')[-1].split('_')[0] for line in (tmp_path/'lab_splits'/f'{s}.txt').read_text().splitlines()}
              for s in SPLITS}
    assert groups == {s: set(record['groups'][s]) for s in SPLITS}
    assert all(groups[s] for s in SPLITS) and sum(map(len, groups.values())) == len(animals)
    assert not (groups['train'] & groups['val'] or groups['train'] & groups['test'] or groups['val'] & groups['test'])
    assert sum(sum(c.values()) for c in record['counts'].values()) == 80
    cfg = load_config('chimpbehave_k400', [f'data.{s}.ann_file={tmp_path}/lab_splits/{s}.txt' for s in SPLITS] +
                      [f'data.{s}.data_prefix=null' for s in SPLITS] + [f'data.classes={tmp_path}/lab_splits/classes.txt',
                                                                         'model.cls_head.num_classes=3'])
    clips, prefix = cfg.data.test.read(classes=config_classes(cfg))
    assert all((prefix/e.path).is_file() for e in clips) and clips.classes == ['climbing', 'sitting', 'walking']

def test_uas_check_reports_and_strict(tmp_path, capsys):
    lab = tmp_path/'lab'
    for c in ('sitting', 'walking'): write_ramp(lab/c/f'{c}_0.mp4')
    write_broken(lab/'sitting')
    (lab/'walking'/'notes.txt').write_text('not a clip\n')
    options = [f'data.train.ann_file={lab}', 'data.val.ann_file=null', 'data.test.ann_file=null', 'data.classes=null',
               'model.cls_head.num_classes=2']
    assert uas_check('chimpbehave_k400', options, out=str(tmp_path/'report')) == 0  # the console script's exit status
    printed = capsys.readouterr().out
    assert 'text.mp4' in printed and 'unreadable' in printed and 'notes.txt' in printed and 'not a video file' in printed
    report = json.loads((tmp_path/'report'/'check.json').read_text())
    assert report['totals']['train']['unreadable'] == 3 and len(report['problems']) == 4
    assert (tmp_path/'report'/'check_train.csv').exists()
    res = run('uas_check', 'chimpbehave_k400', '--cfg_options', *options, '--out', tmp_path/'strict', '--strict')
    assert res.returncode == 1 and 'text.mp4' in res.stdout, res.stdout + res.stderr

def test_uas_check_clean_config_passes_strict(tmp_path, monkeypatch):
    for c in ('sitting', 'walking'): write_ramp(tmp_path/'lab'/c/f'{c}_0.mp4')
    (tmp_path/'lab.yaml').write_text(f'_base_: chimpbehave_k400\ndata:\n  classes: null\n  train: {{ann_file: {tmp_path/"lab"}}}\n'
                                     '  val: {ann_file: null}\n  test: {ann_file: null}\nmodel.cls_head.num_classes: 2\n')
    monkeypatch.chdir(tmp_path)
    assert uas_check(str(tmp_path/'lab.yaml'), strict=True) == 0
    assert (tmp_path/'check_lab'/'check.json').exists()

def test_help_is_the_docments():
    assert 'exit with status 1 when any problem is found' in anno_parser(uas_check).format_help()
    assert 'is kept in one split' in anno_parser(uas_split).format_help()


def test_a_mode_and_switches_that_disagree_are_an_error():
    "`train.mode=lora` with `freeze_backbone=True` alone (which means 'uas') in one source: refused, not silently resolved."
    with pytest.raises(ConfigError, match=r"train.mode='lora' contradicts freeze_backbone"):
        load_config('chimpbehave_k400', ['train.mode=lora', 'freeze_backbone=True'])
    assert load_config('chimpbehave_k400', ['train.mode=uas', 'freeze_backbone=True']).mode == 'uas'


def test_an_existing_reference_config_file_is_read_by_name_with_a_warning(tmp_path):
    path = tmp_path/Path(REF.format('chimpBehave_k400')).name
    path.write_text('total_epochs = 50\n')  # a lab's edited copy: its contents are not read
    with pytest.warns(UserWarning, match='by its name, not its contents'): cfg = load_config(path)
    assert cfg == load_config('chimpbehave_k400')


def test_check_counts_labels_of_an_unnamed_list_against_the_head(tmp_path):
    "Without class names a list's labels must still fit the head: label 12 of a 12-class config is a bad line."
    write_ramp(tmp_path/'a.mp4')
    (tmp_path/'val.txt').write_text('a.mp4 0\na.mp4 12\n')
    cfg = load_config('mammalnet_k400', [f'data.val.ann_file={tmp_path/"val.txt"}', 'data.train.ann_file=null',
                                         'data.test.ann_file=null', f'data.val.data_prefix={tmp_path}'])
    summary = check_config(cfg)['splits']['val']
    assert summary.loc['total', ['listed', 'ok', 'bad_entry']].tolist() == [2, 1, 1]
