"""uas.viz headless: every figure saves as a PNG with the Agg backend and leaves no pyplot figure open;
a confusion matrix of K700-diff's 103 classes stays readable."""
import json

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest

from uas.viz import plot_class_accuracy, plot_confusion, plot_training_curves


@pytest.fixture
def scored():
    "300 clips of 6 classes from a weak classifier."
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, 300)
    return np.eye(6)[labels] * 1.5 + rng.normal(size=(300, 6)), labels


def test_figures_save_headless_and_stay_out_of_pyplot(tmp_path, scored):
    records = [{'event': 'start', 'epochs': 2, 'iters_per_epoch': 10},
               *({'event': 'iter', 'epoch': 1 + (i - 1) // 10, 'iter': i, 'loss': 2 / i, 'lr': [1e-4, 1e-5]}
                 for i in range(1, 21)),
               {'event': 'val', 'epoch': 2, 'top1_acc': 0.5, 'mean_class_accuracy': 0.4}]
    (tmp_path/'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    figures = {'confusion': plot_confusion(*scored), 'accuracy': plot_class_accuracy(*scored),
               'curves': plot_training_curves(tmp_path)}
    for name, fig in figures.items(): fig.savefig(tmp_path/f'{name}.png')
    assert plt.get_fignums() == []
    for name in figures: assert (tmp_path/f'{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_many_classes_drop_annotations_and_thin_ticks():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 103, 1000)
    ax = plot_confusion(np.eye(103)[labels] + rng.normal(size=(1000, 103)), labels,
                        classes=[f'behaviour {i}' for i in range(103)]).axes[0]
    assert len(ax.texts) == 0
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert 1 < len(ticks) < 103 and ticks[0] == 'behaviour 0'
    assert ax.images[0].get_array().shape == (103, 103)
