"""The explorer (`uas.explore`): the projection map and the widgets on a Kinetics-400 checkpoint, and the explorer notebook
and the front page executed in a real Jupyter kernel, the widgets set and what they show checked against a direct computation."""
import base64, json, re, shutil, sys
from io import BytesIO
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from torch.utils.data import Subset
from nbclient import NotebookClient
from PIL import Image

from conftest import ROOT
from helpers import decode_all, kinetics_checkpoint
from uas.data import VideoDataset, read_annotations
from uas.features import CacheMismatchError
from uas.explore import ClipExplorer, cached_clips, demo_clips, plot_projection_map, projection_map, top_projections
from uas.features import extract_features
from uas.mini import mini_dataset
from uas.model import build_recognizer, load_model
from uas.synthetic import make_synthetic
from uas.video import get_pipeline

KINETICS = ROOT/'tests'/'data'/'kinetics'
ROW = re.compile(r'<td[^>]*>(?:<b>)?([^<]+)(?:</b>)?</td><td[^>]*>([0-9.]+)</td>')
TOLERANCE = 2e-3 # the cache holds float16 features, and the tables show 3 decimals


def run_notebook(path, extra:str=None, drop_last:bool=False):
    "Execute the notebook at `path` in a real Jupyter kernel (its folder the working one), `extra` added as a last cell; the notebook."
    nb = nbformat.read(path, as_version=4)
    if drop_last: nb.cells = nb.cells[:-1]
    if extra: nb.cells.append(nbformat.v4.new_code_cell(extra))
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}}).execute()
    return nb


def stdout(cell) -> str: return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream' and o.name == 'stdout')


@torch.no_grad()
def direct(model, dataset, path) -> tuple:
    "The label, behaviour and action probabilities of the clip at `path`, run through the model (the pipeline's views averaged)."
    i = [str(dataset.clip_path(j)) for j in range(len(dataset))].index(str(path))
    item = dataset[i]
    features = model.eval().extract_feat(item['clip'])
    return item['label'], model.cls_head(features).softmax(-1).mean(0).numpy(), model.kinetics_head(features).softmax(-1).mean(0).numpy()


def check_shown(title:str, probabilities:str, actions:str, strip:bytes, path, behaviours, kinetics, classes, action_names, top=5):
    "Assert that an explorer's panels show the clip at `path` with these directly computed probabilities."
    shown = {name: float(p) for name, p in ROW.findall(probabilities)}
    assert list(shown) == [classes[k] for k in np.argsort(-behaviours, kind='stable')] or set(shown) == set(classes)
    for k, name in enumerate(classes): assert abs(shown[name] - behaviours[k]) <= TOLERANCE, (name, shown[name], behaviours[k])
    projected = [(name, float(p)) for name, p in ROW.findall(actions)]
    assert len(projected) == top
    for name, p in projected: assert abs(p - kinetics[action_names.index(name)]) <= TOLERANCE, (name, p)
    others = np.delete(kinetics, [action_names.index(name) for name, _ in projected])
    assert min(p for _, p in projected) >= others.max() - TOLERANCE, 'the top actions shown are not the most probable'
    every = decode_all(path)
    indices = np.linspace(0, len(every) - 1, 8).round().astype(int)
    assert re.search(r'frames ([0-9, ]+)', title).group(1) == ', '.join(map(str, indices))
    np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(strip))), np.concatenate(list(every[indices]), axis=1))


SET_WIDGETS = '''
import base64, json, sys
probe = ClipExplorer(clips)
shown = {}
for name, behaviour in (('wrong', int(clips.labels[~clips.correct][0])), ('correct', None)):
    probe.behaviour.value, probe.outcome.value = behaviour, name
    probe.clip.value = probe.clip.options[-1][1]
    shown[name] = dict(path=str(clips.paths[probe.clip.value]), behaviour=behaviour, title=probe.title.value,
                       probabilities=probe.probabilities.value, actions=probe.actions.value,
                       strip=base64.b64encode(probe.strip.value).decode())
print(json.dumps(dict(work_dir=str(tmp), shown=shown, python=sys.executable)))
'''

def test_explorer_notebook_in_a_kernel_shows_what_the_model_computes():
    "Run nbs/14_explore.ipynb in a kernel, set the widgets (behaviour, wrong or correct, clip) and check what they show."
    nb = run_notebook(ROOT/'nbs'/'14_explore.ipynb', SET_WIDGETS, drop_last=True)
    result = json.loads(stdout(nb.cells[-1]))
    work = Path(result['work_dir'])
    assert result['python'] == sys.executable, f"the kernel 'python3' runs {result['python']}, not this environment's Python"
    try:
        target = json.loads((work/'target'/'synthetic.json').read_text())
        model, dataset = load_model(work/'runs'/'uas_head'/'best.pth'), mini_dataset(target, 'test', 'test')
        for outcome, shown in result['shown'].items():
            label, behaviours, kinetics = direct(model, dataset, shown['path'])
            assert (behaviours.argmax() == label) == (outcome == 'correct'), (outcome, shown['path'])
            if shown['behaviour'] is not None: assert label == shown['behaviour']
            check_shown(shown['title'], shown['probabilities'], shown['actions'], base64.b64decode(shown['strip']), shown['path'],
                        behaviours, kinetics, target['classes'], model.kinetics_head.classes)
    finally: shutil.rmtree(work)


def test_front_page_runs_in_a_kernel():
    nb = run_notebook(ROOT/'nbs'/'index.ipynb')
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == 'error']
    assert not errors, errors
    assert sum(c.cell_type == 'code' and c.execution_count is not None for c in nb.cells) >= 5


@pytest.fixture(scope='module')
def kinetics_set(tmp_path_factory):
    "A Kinetics-400 checkpoint of swin3d_mini, seven synthetic behaviour clips and their feature cache, the K400 names served locally."
    tmp = tmp_path_factory.mktemp('explore')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('UAS_LABELMAP_BASE', str(KINETICS))
        mp.setenv('UAS_CACHE_DIR', str(tmp/'cache'))
        torch.save(kinetics_checkpoint(400), tmp/'k400.pth')
        model = build_recognizer('swin3d_mini', 7, 'uas', pretrained=tmp/'k400.pth').eval()
        target = make_synthetic(tmp/'clips', 'target', seed=0, splits=dict(test=7), min_per_class=1, size=(48, 48), num_frames=8)
        dataset = VideoDataset(read_annotations(target['lists']['test']), target['root'],
                               get_pipeline('chimpbehave_val', clip_len=8, short_side=48, crop_size=48))
        cache = extract_features(model.backbone, dataset, tmp/'features', arch='swin3d_mini', progress=False)
        yield model, dataset, cache, cached_clips(model, cache, dataset, target['classes'])


def test_projection_map_on_a_kinetics_400_checkpoint_names_the_k400_actions(kinetics_set):
    model, dataset, cache, clips = kinetics_set
    k400 = (KINETICS/'label_map_k400.txt').read_text().splitlines()
    assert model.kinetics_head.num_classes == 400 and clips.actions == k400
    pmap = projection_map(clips)
    assert pmap.shape == (7, 400) and list(pmap.columns) == k400 and list(pmap.index) == clips.classes
    expected = np.stack([direct(model, dataset, p)[2] for p in clips.paths])
    for k, name in enumerate(clips.classes):
        np.testing.assert_allclose(pmap.loc[name].values, expected[clips.labels == k].mean(0), atol=TOLERANCE)
    table = top_projections(pmap, top=2)
    assert set(table.action) <= set(k400) and table.groupby('behaviour').size().eq(2).all()
    ax = plot_projection_map(pmap, top=2).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(dict.fromkeys(table.action))
    assert ax.get_title() == 'UAS projection map' and ax.get_ylabel() == 'behaviour'


def test_explorer_on_a_kinetics_400_checkpoint(kinetics_set):
    "Every behaviour and outcome filter leaves the clips a direct computation says, and shows the first and the last of them."
    model, dataset, cache, clips = kinetics_set
    computed = [direct(model, dataset, path) for path in clips.paths]
    explorer = ClipExplorer(clips)
    for behaviour in range(len(clips.classes)):
        explorer.behaviour.value = behaviour
        for outcome in ('correct', 'wrong'):
            explorer.outcome.value = outcome
            expected = [i for i, (label, probs, _) in enumerate(computed)
                        if label == behaviour and (probs.argmax() == label) == (outcome == 'correct')]
            assert explorer.choices() == expected, (behaviour, outcome)
            if not expected:
                assert explorer.clip.value is None and explorer.title.value == 'no clip left by these filters'
                continue
            for i in (expected[0], expected[-1]):
                explorer.clip.value = i
                check_shown(explorer.title.value, explorer.probabilities.value, explorer.actions.value, explorer.strip.value,
                            clips.paths[i], *computed[i][1:], clips.classes, clips.actions)


def test_bad_input_names_what_is_wrong(kinetics_set, tmp_path):
    model, dataset, cache, clips = kinetics_set
    with pytest.raises(FileNotFoundError, match=str(tmp_path/'target'/'synthetic.json')): demo_clips(tmp_path)
    plain = build_recognizer('swin3d_mini', 7, 'uas')
    with pytest.raises(ValueError, match='no frozen action head'): cached_clips(plain, None, dataset)
    with pytest.raises(CacheMismatchError, match=f'{cache.root} was extracted from VideoDataset of {len(dataset)} '):
        cached_clips(model, cache, Subset(dataset, [0, 1]))
