"""The console scripts with the reference's own arguments, in processes of their own, and every preset for one
training iteration and one test batch (in this process)."""
import json, os, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import Subset

from helpers import official_checkpoint, write_broken
from uas.backbone import swin3d_mini
from uas.cli import config_dataset, train_config
from uas.config import PRESETS, load_config
from uas.synthetic import make_synthetic
from uas.train import Callback, CancelFitException, evaluate_online

BIN = Path(sys.executable).parent
KINETICS_MAPS = Path(__file__).parent/'data'/'kinetics'
README_CONFIG = 'configs/recognition/swin/swin_base_patch244_window877_chimpBehave_k400.py'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "Synthetic ChimpBehave-like clips, an official-layout Kinetics-400 checkpoint of swin3d_mini, and the small overrides."
    tmp = tmp_path_factory.mktemp('cli')
    clips = make_synthetic(tmp/'clips', 'target', seed=0, splits=dict(train=14, val=7, test=7), min_per_class=1,
                           size=(32, 32), num_frames=8)
    torch.manual_seed(0)
    weights = {f'backbone.{k}': v for k, v in swin3d_mini().state_dict().items()}
    weights.update({'cls_head.fc_cls.weight': torch.randn(400, 256) * 0.01, 'cls_head.fc_cls.bias': torch.zeros(400)})
    torch.save(official_checkpoint(weights), tmp/'kinetics400.pth')
    data = [f'data.{s}.{k}={v}' for s in ('train', 'val', 'test') for k, v in
            [('ann_file', clips['lists'][s]), ('data_prefix', clips['root']), ('clip_len', 4), ('short_side', 32), ('crop_size', 32)]]
    small = ['model.backbone.arch=swin3d_mini', 'total_epochs=1', 'data.workers_per_gpu=0', *data]
    return tmp, clips, small


def script(name, *args, env=None):
    "Run console script `name` in a new process; its completed process."
    return subprocess.run([str(BIN/name), *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope='module')
def uas_run(setup):
    "The README's first command, training the UAS projection: `uas_train CONFIG --work-dir DIR --cfg-options ...`."
    tmp, clips, small = setup
    done = script('uas_train', README_CONFIG, '--work-dir', tmp/'uas', '--cfg-options', 'freeze_backbone=True',
                  f'load_from={tmp/"kinetics400.pth"}', *small)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_reference_readme_commands_run_as_console_scripts(setup, uas_run):
    tmp, clips, small = setup
    ckpt = f'load_from={tmp/"kinetics400.pth"}'
    assert f'run folder: {tmp/"uas"}' in uas_run.stdout
    assert {'config.yaml', 'log.jsonl', 'epoch_1.pth', 'latest.pth', 'best.pth', 'record.json'} <= {p.name for p in (tmp/'uas').iterdir()}
    record = json.loads((tmp/'uas'/'record.json').read_text())
    assert (record['mode'], record['training'], record['epochs']) == ('uas', 'faithful', 1)
    assert record['data']['train']['sha256'] and record['metrics']['top1_acc'] is not None and record['versions']['torch']
    lora = script('uas_train', README_CONFIG, '--work-dir', tmp/'lora', '--cfg-options', 'freeze_backbone=True', ckpt,
                  'model.backbone.use_lora=True', 'model.backbone.lora_rank=32', 'model.backbone.lora_alpha=32', *small)
    assert lora.returncode == 0, lora.stderr[-3000:]
    assert json.loads((tmp/'lora'/'record.json').read_text())['mode'] == 'lora'
    tested = script('uas_test', README_CONFIG, tmp/'lora'/'epoch_1.pth', '--eval', 'top_k_accuracy', 'mean_class_accuracy',
                    '--cfg-options', ckpt, *small)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert 'top1_acc: ' in tested.stdout and 'mean_class_accuracy: ' in tested.stdout
    test_record = json.loads((tmp/'lora'/'test_epoch_1.json').read_text())
    n_test = sum(clips['counts']['test'].values())
    assert (test_record['clips'], test_record['views'], test_record['mode']) == (n_test, 3, 'lora')
    for key in ('checkpoint', 'pipeline', 'top1_acc', 'top5_acc', 'mean_class_accuracy', 'mean_class_accuracy_true', 'skipped', 'scores'):
        assert key in test_record, key
    assert len(pd.read_csv(tmp/'lora'/test_record['scores'])) == n_test
    assert (tmp/'lora'/'test_epoch_1_confusion.png').stat().st_size > 1000


def test_a_bad_key_is_one_line_and_exit_status_1(setup):
    done = script('uas_train', README_CONFIG, '--cfg-options', 'optimizer.learning_rate=1')
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert 'optimizer.learning_rate' in done.stderr


def test_predict_a_folder_from_the_model_file_alone(setup, uas_run, tmp_path):
    tmp, clips, small = setup
    new = tmp_path/'new'
    new.mkdir()
    good = sorted(Path(clips['root']).rglob('*.mp4'))[:3]
    for path in good: (new/path.name).write_bytes(path.read_bytes())
    (new/'notes.txt').write_text('filmed on Tuesday')
    broken = write_broken(new)
    env = {**os.environ, 'UAS_LABELMAP_BASE': str(KINETICS_MAPS), 'UAS_CACHE_DIR': str(tmp_path/'cache')}
    done = script('uas_predict', tmp/'uas'/'best.pth', new, '--out', tmp_path/'predictions.csv', '--no-progress', env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = pd.read_csv(tmp_path/'predictions.csv')
    assert sorted(Path(p).name for p in predictions.path) == sorted(p.name for p in good)
    assert {'behaviour_1', 'p_behaviour_1', 'kinetics_1', 'p_kinetics_1'} <= set(predictions.columns)
    assert (predictions[['p_behaviour_1', 'p_behaviour_2', 'p_behaviour_3']].diff(axis=1).iloc[:, 1:] <= 0).all().all()
    problems = pd.read_csv(tmp_path/'predictions_problems.csv')
    assert sorted(Path(p).name for p in problems.path) == sorted([p.name for p in broken] + ['notes.txt'])
    assert 'not a video file (.txt)' in set(problems.reason)
    for path in broken + [new/'notes.txt']: assert path.name in done.stdout


class OneIteration(Callback):
    "End training after its first iteration."
    def after_batch(self, learn): raise CancelFitException()


@pytest.mark.parametrize('preset', list(PRESETS))
def test_each_preset_runs_one_training_iteration_and_one_test_batch(setup, tmp_path, monkeypatch, preset):
    tmp, clips, small = setup
    monkeypatch.setenv('UAS_LABELMAP_BASE', str(KINETICS_MAPS))
    monkeypatch.setenv('UAS_CACHE_DIR', str(tmp_path/'cache'))
    load_from = [] if preset == 'synthetic_mini' else [f'load_from={tmp/"kinetics400.pth"}']
    cfg = load_config(preset, [*small, *load_from, f'work_dir={tmp_path/"run"}'])
    learn = train_config(cfg, preset, cbs=[OneIteration()], progress=False)
    assert learn.iter == 1 and learn.model.mode == PRESETS[preset].get('train', {}).get('mode', learn.settings.mode)
    test = config_dataset(cfg, 'test')
    evaluation = evaluate_online(learn.model, Subset(test, [0, 1]), batch_size=2, progress=False)
    assert evaluation.scores.shape == (2, cfg.model.cls_head.num_classes)
    assert torch.allclose(evaluation.scores.sum(1), torch.ones(2), atol=1e-4)
