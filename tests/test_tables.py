"""The paper's tables filled from real run records: `uas_reproduce` trains and tests rows into run folders, the tables and
the efficiency figure's CSV read them back, a rerun skips the rows already tested, and an empty table says what to run."""
import json, subprocess, sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from uas.bench import main as bench
from uas.config import SPLITS, ConfigError
from uas.synthetic import make_synthetic
from uas.cli import train_config
from uas.tables import NOT_RUN, efficiency_points, fill_commands, load_table, paper_table, reproduce, row_config, write_figures
from uas.train import Callback, CancelFitException

BIN = Path(sys.executable).parent
SMALL = ['data.workers_per_gpu=0', 'total_epochs=1', 'load_from=mini',
         *(f'data.{s}.{k}={v}' for s in SPLITS for k, v in (('clip_len', 4), ('short_side', 32), ('crop_size', 32)))]
TWO_ROWS = """title: two synthetic_mini variants
rows:
  - run: head_a
    config: synthetic_mini
    options: [optimizer.lr=0.001]
  - run: head_b
    config: synthetic_mini
    options: [optimizer.lr=0.003]
    label: a larger learning rate
"""


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    "A data root as the presets expect it: the synthetic target set's lists in data/synthetic/."
    root = tmp_path_factory.mktemp('tables')
    make_synthetic(root/'data'/'synthetic', 'target', seed=0, splits=dict(train=7, val=7, test=7), min_per_class=1,
                   size=(32, 32), num_frames=8)
    return root


def script(*args):
    "`uas_reproduce ARGS` in a process of its own; its completed process."
    return subprocess.run([str(BIN/'uas_reproduce'), *map(str, args)], capture_output=True, text=True, timeout=600)


def test_table_c_rows_run_land_in_their_cells_and_in_the_figure(data_root, tmp_path):
    "Table C's UAS and full fine-tuning rows, made small (swin3d_mini from the mini space, synthetic clips, one epoch)."
    runs = tmp_path/'runs'
    small = [*SMALL, 'model.backbone.arch=swin3d_mini', 'data.classes=null', 'model.cls_head.num_classes=7',
             *(f'data.{s}.ann_file=data/synthetic/{s}.txt' for s in SPLITS), *(f'data.{s}.data_prefix=null' for s in SPLITS)]
    reproduce('C', data_root, runs, small, rows=['k700diff_k600', 'k700diff_k600_full'], progress=False)
    table = paper_table('C', runs)
    for run, row in [('k700diff_k600', 'UAS'), ('k700diff_k600_full', 'full fine-tuning')]:
        record = json.loads((runs/run/'record.json').read_text())
        test = json.loads((runs/run/'test_epoch_1.json').read_text())
        assert test['config'] == run and record['arch'] == 'swin3d_mini'
        assert table.loc[row, 'top-1 (ours)'] == pytest.approx(100 * test['top1_acc'])
        assert table.loc[row, 'mean class (ours)'] == pytest.approx(100 * test['mean_class_accuracy'])
        assert table.loc[row, 'train hours (ours)'] == pytest.approx(record['train_seconds'] / 3600)
        assert (table.loc[row, 'device (ours)'], table.loc[row, 'training (ours)']) == (record['device'], 'faithful')
    assert table.loc['LoRA r=32 (q, v)', ['top-1 (ours)', 'mean class (ours)', 'train hours (ours)']].tolist() == [NOT_RUN] * 3
    assert table.loc['UAS', 'top-1 (paper)'] == 87.9 and table.loc['UAS', 'trainable (ours)'] == 105_575  # the preset's Swin-B
    assert paper_table('A', runs)['top-1 (ours)'].tolist() == [NOT_RUN]
    assert fill_commands('C', runs) == [f'uas_reproduce C --data-root DATA --work-dir {runs} --rows k700diff_k600_lora']

    written = write_figures(tmp_path/'figures', runs)
    image = matplotlib.image.imread(tmp_path/'figures'/'efficiency.png')
    assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0
    plotted = pd.read_csv(tmp_path/'figures'/'efficiency.csv')
    pd.testing.assert_frame_equal(plotted, efficiency_points(runs), check_dtype=False)
    ours = plotted[plotted.source == 'this project (run records)'].set_index('method')
    seconds = {r: json.loads((runs/r/'record.json').read_text())['train_seconds'] for r in ('k700diff_k600', 'k700diff_k600_full')}
    assert ours.loc['UAS', 'relative_time'] == pytest.approx(seconds['k700diff_k600'] / seconds['k700diff_k600_full'])
    assert ours.loc['full fine-tuning', 'mean_class_accuracy'] == pytest.approx(table.loc['full fine-tuning', 'mean class (ours)'])
    assert sorted(plotted.source.str.split(' ').str[0].unique()) == ['demo', 'paper', 'this']
    saved = pd.read_csv(tmp_path/'figures'/'table_C.csv', index_col='row')  # a column of numbers and 'not run' reads back as text
    assert float(saved.loc['UAS', 'top-1 (ours)']) == pytest.approx(table.loc['UAS', 'top-1 (ours)'])
    assert {p.name for p in written} == {'efficiency.png', 'efficiency.csv', 'table_A.csv', 'table_B.csv', 'table_C.csv'}


def test_a_table_without_records_says_not_run_and_how_to_fill_it(tmp_path):
    table = paper_table('B', tmp_path/'runs')
    assert (table[['top-1 (ours)', 'mean class (ours)', 'train hours (ours)', 'device (ours)']] == NOT_RUN).all().all()
    assert table['top-1 (paper)'].tolist() == [93.7, 93.5, 94.2] and table['trainable (ours)'].tolist() == [7_175] * 3
    assert fill_commands('B', tmp_path/'runs', 'DIR') == [
        f'uas_reproduce B --data-root DIR --work-dir {tmp_path/"runs"} --rows chimpbehave_k{k}' for k in (400, 600, 700)]


def test_uas_reproduce_fills_a_yaml_table_row_by_row(data_root, tmp_path):
    "The first row alone, then the whole table: the first row is skipped (its records untouched), both rows are filled."
    (tmp_path/'two.yaml').write_text(TWO_ROWS)
    runs = tmp_path/'runs'
    first = script(tmp_path/'two.yaml', '--data-root', data_root, '--work-dir', runs, '--rows', 'head_a', '--no-progress',
                   '--cfg-options', *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'head_a: trained and tested' in first.stdout and not (runs/'head_b').exists()
    tested = (runs/'head_a'/'test_epoch_1.json').read_bytes()
    assert paper_table(tmp_path/'two.yaml', runs)['top-1 (ours)'].tolist()[1] == NOT_RUN

    both = script(tmp_path/'two.yaml', '--data-root', data_root, '--work-dir', runs, '--no-progress', '--cfg-options', *SMALL)
    assert both.returncode == 0, both.stderr[-3000:]
    assert 'head_a: skipped: its test record exists' in both.stdout and 'head_b: trained and tested' in both.stdout
    assert (runs/'head_a'/'test_epoch_1.json').read_bytes() == tested
    table = paper_table(tmp_path/'two.yaml', runs)
    assert list(table.index) == ['head_a', 'a larger learning rate']
    for run, row in zip(('head_a', 'head_b'), table.index):
        test = json.loads((runs/run/'test_epoch_1.json').read_text())
        assert table.loc[row, 'top-1 (ours)'] == pytest.approx(100 * test['top1_acc'])
        assert json.loads((runs/run/'record.json').read_text())['settings']['lr'] == {'head_a': 1e-3, 'head_b': 3e-3}[run]


def test_a_bad_table_file_is_one_line_naming_file_and_row(data_root, tmp_path):
    (tmp_path/'bad.yaml').write_text('rows:\n  - run: a\n    config: synthetic_mini\n  - run: b\n')
    done = script(tmp_path/'bad.yaml', '--data-root', data_root)
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert f"uas_reproduce: error: {tmp_path/'bad.yaml'}: rows[1]: needs 'config', a string" in done.stderr
    with pytest.raises(ConfigError, match=r"--rows: \['k700diff_k600_lora_r8'\] are not rows of table C: k700diff_k600, "):
        reproduce('C', data_root, tmp_path/'runs', rows=['k700diff_k600_lora_r8'])


def test_table_c_puts_the_measured_cost_beside_the_papers(tmp_path):
    "A cost record (the quick `uas_bench cost`) fills Table C's measured cost column, named by device and clock, mode by mode."
    assert bench(['cost', '--quick', '--out_dir', str(tmp_path)]) == 0
    cost = json.loads((tmp_path/'cost.json').read_text())['results']['devices']['cpu']
    table = paper_table('C', tmp_path/'runs', cost=tmp_path/'cost.json')
    measured = table[f"cost / full ({cost['name']}, cpu time)"]
    relative = {m: row['relative'] for m, row in cost['tables']['cpu'].items()}
    assert measured.tolist() == [relative['uas'], relative['lora'], 1.0]
    assert table['cost / full (paper)'].round(2).tolist() == [0.51, 0.82, 1.0]
    assert 'cost / full (paper)' not in paper_table('B', tmp_path/'runs', cost=tmp_path/'cost.json')


class StopAfterFirstEpoch(Callback):
    "End training as the second epoch starts, after the first was saved: a run stopped half-way."
    def before_epoch(self, learn):
        if learn.epoch == 1: raise CancelFitException()


def test_a_stopped_row_resumes_from_its_latest_checkpoint(data_root, tmp_path, capsys):
    (tmp_path/'two.yaml').write_text(TWO_ROWS)
    row = load_table(tmp_path/'two.yaml').rows[0]
    options = [o for o in SMALL if o != 'total_epochs=1'] + ['total_epochs=2']
    train_config(row_config(row, data_root, tmp_path/'runs', options), row.config, cbs=[StopAfterFirstEpoch()], progress=False)
    run = tmp_path/'runs'/'head_a'
    assert (run/'latest.pth').is_file() and not (run/'record.json').exists()
    reproduce(tmp_path/'two.yaml', data_root, tmp_path/'runs', options, rows=['head_a'], progress=False)
    assert 'head_a: resumed, trained and tested' in capsys.readouterr().out
    events = [json.loads(line)['event'] for line in (run/'log.jsonl').read_text().splitlines()]
    assert events.count('start') == 1 and events.count('resume') == 1 and events.count('epoch') == 2
    assert json.loads((run/'record.json').read_text())['epochs'] == 2 and (run/'test_epoch_2.json').is_file()
