"Tests of `uas.checkpoint`: official and torchvision layouts against torchvision's features, the safe reader, the report, the registry and the download cache."
import pickle, re, shutil, types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import uas.checkpoint as ck
from helpers import CreatesFile, official_checkpoint
from uas.bench import torchvision_features
from uas.backbone import swin3d_b, swin3d_mini, swin3d_t
from uas.checkpoint import CheckpointError, Mismatch, download, k700_diff_classes, kinetics_classes, load_backbone, read_checkpoint

KINETICS = Path(__file__).parent/'data'/'kinetics'


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    "An empty download cache, so that no test reads or fills the user's."
    folder = tmp_path/'cache'
    monkeypatch.setenv('UAS_CACHE_DIR', str(folder))
    return folder


# --- writing checkpoints as the official code and other numpy versions would ---

def official_name(key):
    """The official Video Swin name of a torchvision `swin3d_*` key, written independently of uas.backbone:
    `features.{2i}.{j}` is `backbone.layers.{i}.blocks.{j}`, `features.{2i+1}` is `backbone.layers.{i}.downsample`,
    `mlp.0`/`mlp.3` are `mlp.fc1`/`mlp.fc2`, `head` is the Kinetics head `cls_head.fc_cls`."""
    if key.startswith('head.'): return 'cls_head.fc_cls.' + key[len('head.'):]
    m = re.match(r'features\.(\d+)\.(.*)', key)
    if m is None: return 'backbone.' + key
    stage, rest = int(m[1]), m[2]
    if stage % 2: return f'backbone.layers.{stage // 2}.downsample.{rest}'
    block, rest = rest.split('.', 1)
    rest = rest.replace('mlp.0.', 'mlp.fc1.').replace('mlp.3.', 'mlp.fc2.')
    return f'backbone.layers.{stage // 2}.blocks.{block}.{rest}'


def tv_checkpoint(tv_model):
    "torchvision weights (index buffers and Kinetics head included) as an official mmcv checkpoint."
    return official_checkpoint({official_name(k): v.clone() for k, v in tv_model.state_dict().items()})


class Numpy1Pickler(pickle._Pickler):
    "A pickler that names numpy's scalar constructor as numpy 1 did (`numpy.core.multiarray.scalar`)."
    def save_global(self, obj, name=None):
        if obj is ck._numpy_scalar():
            self.write(pickle.GLOBAL + b'numpy.core.multiarray\nscalar\n')
            self.memoize(obj)
        else: super().save_global(obj, name)


NUMPY1 = types.SimpleNamespace(Pickler=Numpy1Pickler, __name__='numpy1_pickle')


def check_official_file(tv_model, ours, tmp_path):
    torch.save(tv_checkpoint(tv_model), tmp_path/'official.pth')
    report = load_backbone(ours, tmp_path/'official.pth')
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert torch.equal(report.head.weight, tv_model.head.weight.detach())
    assert torch.equal(report.head.bias, tv_model.head.bias.detach())
    assert report.head.num_classes == 400
    blocks = [k for k in tv_model.state_dict() if k.endswith('relative_position_index')]
    assert sorted(report.skipped) == sorted(['meta', 'optimizer'] + [official_name(k) for k in blocks])
    assert len(report.loaded) == len(ours.state_dict())
    clip = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad(): got, expected = ours.eval()(clip), torchvision_features(tv_model, clip)
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-4


# --- the official layout, and torchvision's, give torchvision's features ---

def test_official_file_of_torchvision_swin3d_t_gives_its_features(tmp_path):
    torch.manual_seed(0)
    check_official_file(torchvision.models.video.swin3d_t().eval(), swin3d_t(), tmp_path)


@pytest.mark.slow
def test_official_file_of_torchvision_swin3d_b_gives_its_features(tmp_path):
    torch.manual_seed(1)
    check_official_file(torchvision.models.video.swin3d_b().eval(), swin3d_b(), tmp_path)


def test_torchvision_layout_loads_through_the_converter(tmp_path):
    torch.manual_seed(2)
    tv = torchvision.models.video.swin3d_t().eval()
    torch.save({'model': tv.state_dict()}, tmp_path/'tv.pth')
    ours = swin3d_t()
    report = load_backbone(ours, str(tmp_path/'tv.pth'))
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert torch.equal(report.head.weight, tv.head.weight.detach())
    assert len(report.skipped) == 12 and all(k.endswith('relative_position_index') for k in report.skipped)
    clip = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad(): assert (ours.eval()(clip) - torchvision_features(tv, clip)).abs().max() <= 1e-4


def test_wrappers_and_prefixes_are_removed():
    source = swin3d_mini()
    sd = {f'module.backbone.{k}': v for k, v in source.state_dict().items()}
    model = swin3d_mini()
    report = load_backbone(model, {'module': sd, 'epoch': 3})
    assert report.skipped == ['epoch'] and report.head is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


# --- keys that do not fit ---

def test_renamed_key_strict_names_missing_and_unexpected_and_leaves_model_alone():
    sd = dict(swin3d_mini().state_dict())
    sd['layers.1.blocks.0.attn.qkv.kernel'] = sd.pop('layers.1.blocks.0.attn.qkv.weight')
    model = swin3d_mini()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e: load_backbone(model, sd)
    assert 'missing (1): layers.1.blocks.0.attn.qkv.weight' in str(e.value)
    assert 'unexpected (1): layers.1.blocks.0.attn.qkv.kernel' in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_renamed_key_non_strict_reports_both_and_loads_the_rest():
    source = swin3d_mini()
    sd = dict(source.state_dict())
    sd['layers.1.blocks.0.attn.qkv.kernel'] = sd.pop('layers.1.blocks.0.attn.qkv.weight')
    model = swin3d_mini()
    report = load_backbone(model, sd, strict=False)
    assert report.missing == ['layers.1.blocks.0.attn.qkv.weight']
    assert report.unexpected == ['layers.1.blocks.0.attn.qkv.kernel']
    assert torch.equal(model.norm.weight, source.norm.weight)
    assert not torch.equal(model.layers[1].blocks[0].attn.qkv.weight, source.layers[1].blocks[0].attn.qkv.weight)


def test_wrong_shape_names_key_and_both_shapes():
    sd = dict(swin3d_mini().state_dict())
    sd['patch_embed.proj.weight'] = torch.zeros(32, 3, 2, 8, 8)
    with pytest.raises(CheckpointError, match=re.escape('patch_embed.proj.weight: checkpoint (32, 3, 2, 8, 8) vs model (32, 3, 2, 4, 4)')):
        load_backbone(swin3d_mini(), sd)
    report = load_backbone(swin3d_mini(), sd, strict=False)
    assert report.mismatched == [Mismatch('patch_embed.proj.weight', (32, 3, 2, 8, 8), (32, 3, 2, 4, 4))]
    assert 'patch_embed.proj.weight' not in report.loaded


# --- files that are not checkpoints ---

def test_truncated_file_is_named(tmp_path):
    torch.save({'state_dict': swin3d_mini().state_dict()}, tmp_path/'full.pth')
    data = (tmp_path/'full.pth').read_bytes()
    (tmp_path/'cut.pth').write_bytes(data[:len(data) // 3])
    with pytest.raises(CheckpointError, match='cut.pth: cannot read the checkpoint, it is truncated or corrupt') as e:
        load_backbone(swin3d_mini(), tmp_path/'cut.pth')
    assert e.value.__cause__ is None and e.value.__context__ is None


def test_truncated_legacy_file_is_named(tmp_path):
    torch.save({'state_dict': swin3d_mini().state_dict()}, tmp_path/'old.pth', _use_new_zipfile_serialization=False)
    data = (tmp_path/'old.pth').read_bytes()
    (tmp_path/'old_cut.pth').write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match='old_cut.pth: cannot read the checkpoint'): read_checkpoint(tmp_path/'old_cut.pth')


@pytest.mark.parametrize('text', ['not a checkpoint\n', '<html><body>404: Not Found</body></html>'])
def test_text_file_named_pth_is_named(tmp_path, text):
    (tmp_path/'model.pth').write_text(text)
    with pytest.raises(CheckpointError, match=r'model.pth: not a PyTorch checkpoint'):
        load_backbone(swin3d_mini(), tmp_path/'model.pth')


def test_empty_and_absent_files(tmp_path):
    (tmp_path/'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty.pth: the file is empty'): read_checkpoint(tmp_path/'empty.pth')
    with pytest.raises(CheckpointError, match='absent.pth: no such file'): load_backbone(swin3d_mini(), tmp_path/'absent.pth')


# --- safety ---

@pytest.mark.parametrize('numpy1', [False, True])
def test_numpy_scalars_in_meta_load_safely(tmp_path, numpy1):
    path = tmp_path/'meta.pth'
    ckpt = {'meta': {'best': np.float64(0.5), 'iter': np.int64(3), 'lr': np.float32(1e-3), 'ok': np.bool_(True)},
            'state_dict': {f'backbone.{k}': v for k, v in swin3d_mini().state_dict().items()}}
    torch.save(ckpt, path, **({'pickle_module': NUMPY1} if numpy1 else {}))
    scalar = 'numpy.core.multiarray.scalar' if numpy1 else 'numpy._core.multiarray.scalar'
    assert scalar in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError): torch.load(path, weights_only=True)
    meta = read_checkpoint(path)['meta']
    assert meta == ckpt['meta'] and type(meta['iter']) is np.int64 and type(meta['lr']) is np.float32
    assert load_backbone(swin3d_mini(), path).skipped == ['meta']


def test_pickle_that_creates_a_file_is_refused_and_never_runs(tmp_path):
    target = tmp_path/'pwned.txt'
    ckpt = {'state_dict': swin3d_mini().state_dict(), 'meta': {'hook': CreatesFile(target)}}
    torch.save(ckpt, tmp_path/'evil.pth')
    assert not target.exists()
    with pytest.raises(CheckpointError) as e: load_backbone(swin3d_mini(), tmp_path/'evil.pth')
    assert 'evil.pth' in str(e.value) and 'io.open' in str(e.value) and 'trust=True' in str(e.value)
    assert not target.exists()
    report = load_backbone(swin3d_mini(), tmp_path/'evil.pth', trust=True)
    assert target.exists() and report.skipped == ['meta'] and report.loaded


def test_legacy_format_pickle_is_refused_naming_the_global(tmp_path):
    "The pre-zip format has no archive to scan: the refused global is named from torch's own message."
    target = tmp_path/'pwned.txt'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': {'hook': CreatesFile(target)}}, tmp_path/'old_evil.pth',
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r'old_evil.pth: refused to unpickle io.open: .*trust=True'):
        read_checkpoint(tmp_path/'old_evil.pth')
    assert not target.exists()


def test_other_numpy_globals_stay_refused(tmp_path):
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': {'array': np.arange(3)}}, tmp_path/'array.pth')
    with pytest.raises(CheckpointError, match='refused to unpickle .*numpy'): read_checkpoint(tmp_path/'array.pth')
    assert (read_checkpoint(tmp_path/'array.pth', trust=True)['meta']['array'] == np.arange(3)).all()


def test_a_wrapper_that_contains_itself_is_an_error_not_a_hang(tmp_path):
    "A pickle can build a dict that holds itself; unwrapping it must stop with an error naming the file."
    looped = {'epoch': 1}
    looped['model'] = looped
    torch.save(looped, tmp_path/'looped.pth')
    with pytest.raises(CheckpointError, match="looped.pth: its 'model' wrapper contains itself"):
        load_backbone(swin3d_mini(), tmp_path/'looped.pth')


# --- registry, cache and Kinetics names ---

def test_kinetics_classes_in_head_order_and_k700_diff(cache, monkeypatch):
    monkeypatch.setenv('UAS_LABELMAP_BASE', KINETICS.resolve().as_uri())
    for n in (400, 600, 700):
        names = kinetics_classes(n)
        assert names == (KINETICS/f'label_map_k{n}.txt').read_text().splitlines()
        assert len(names) == len(set(names)) == n
    diff = k700_diff_classes()
    assert len(diff) == 103
    k600 = {c.lower() for c in kinetics_classes(600)}
    assert not any(c.lower() in k600 for c in diff)
    assert 'passing American football (not in game)' not in diff
    assert diff == [c for c in kinetics_classes(700) if c in diff]
    with pytest.raises(ValueError): kinetics_classes(500)


def test_second_call_uses_the_cache(cache, tmp_path, monkeypatch):
    source = tmp_path/'maps'
    shutil.copytree(KINETICS, source)
    monkeypatch.setenv('UAS_LABELMAP_BASE', str(source))
    first = kinetics_classes(400)
    cached = cache/'label_map_k400.txt'
    stamp = cached.stat().st_mtime_ns
    shutil.rmtree(source)
    assert kinetics_classes(400) == first
    assert cached.stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == ['label_map_k400.txt']


def test_wrong_checksum_leaves_nothing_in_the_cache(cache, tmp_path, monkeypatch):
    (tmp_path/'maps').mkdir()
    (tmp_path/'maps'/'label_map_k400.txt').write_text('\n'.join(f'class {i}' for i in range(400)))
    monkeypatch.setenv('UAS_LABELMAP_BASE', (tmp_path/'maps').as_uri())
    with pytest.raises(CheckpointError, match='label_map_k400.txt: the downloaded file does not have the expected SHA-256'):
        kinetics_classes(400)
    assert list(cache.iterdir()) == []


class Interrupted:
    "A response that delivers one piece and then fails (`error`) or ends early (`error=None`)."
    def __init__(self, response, error): self.response, self.error, self.calls = response, error, 0
    headers = property(lambda self: self.response.headers)
    def read(self, n):
        self.calls += 1
        if self.calls == 1: return self.response.read(100)
        if self.error: raise self.error
        return b''
    def __enter__(self): return self
    def __exit__(self, *exc): self.response.close()


@pytest.mark.parametrize('error', [KeyboardInterrupt(), ConnectionResetError('reset by peer'), None])
def test_interrupted_download_leaves_no_half_file(cache, monkeypatch, error):
    monkeypatch.setenv('UAS_LABELMAP_BASE', KINETICS.resolve().as_uri())
    real = ck.urlopen
    monkeypatch.setattr(ck, 'urlopen', lambda request: Interrupted(real(request), error))
    expected = pytest.raises(KeyboardInterrupt) if isinstance(error, KeyboardInterrupt) else pytest.raises(CheckpointError, match='label_map_k600.txt')
    with expected: download('label_map_k600', progress=False)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(ck, 'urlopen', real)
    assert download('label_map_k600', progress=False).read_text() == (KINETICS/'label_map_k600.txt').read_text()


def test_registry_names_download_through_the_release_base(cache, tmp_path, monkeypatch):
    releases = tmp_path/'releases'
    (releases/'Pre-release').mkdir(parents=True)
    (releases/'Pre-release'/'chimpbehave_train.txt').write_text('clip_0001.mp4 0\nclip_0002.mp4 3\n')
    (releases/'Pre-train').mkdir()
    source = swin3d_mini()
    torch.save({'meta': {'epoch': np.int64(30)}, 'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}},
               releases/'Pre-train'/'swin_base_patch244_window877_kinetics400_22k.pth')
    monkeypatch.setenv('UAS_DOWNLOAD_BASE', releases.as_uri())
    path = download('chimpbehave_train', progress=False)
    assert path == cache/'chimpbehave_train.txt' and path.read_text().startswith('clip_0001.mp4 0')
    model = swin3d_mini()
    report = load_backbone(model, 'k400', progress=False)
    assert report.source == str(cache/'swin_base_patch244_window877_kinetics400_22k.pth')
    assert torch.equal(model.norm.weight, source.norm.weight)


def test_offline_the_error_names_where_to_put_a_file_fetched_by_hand(cache, tmp_path, monkeypatch):
    "A release server that cannot be reached: the message names the cache folder and file name, and a file put there loads."
    monkeypatch.setenv('UAS_DOWNLOAD_BASE', (tmp_path/'offline').as_uri())
    name = 'swin_base_patch244_window877_kinetics400_22k.pth'
    with pytest.raises(CheckpointError) as e: load_backbone(swin3d_mini(), 'k400', progress=False)
    assert f'save it as {cache/name} (cache folder {cache}, file name {name})' in str(e.value)
    assert list(cache.iterdir()) == []
    source = swin3d_mini()
    torch.save(official_checkpoint({f'backbone.{k}': v for k, v in source.state_dict().items()}), cache/name)   # fetched by hand
    model = swin3d_mini()
    assert load_backbone(model, 'k400').source == str(cache/name)
    assert torch.equal(model.norm.weight, source.norm.weight)


def test_one_key_comparison():
    diff = ck.compare_keys({'a': torch.zeros(2), 'b': torch.zeros(3)}, {'a': torch.zeros(4), 'c': torch.zeros(1)})
    assert (diff.missing, diff.unexpected, diff.mismatched) == (['c'], ['b'], [Mismatch('a', (2,), (4,))])
    assert diff.problems.splitlines() == ['  missing (1): c', '  unexpected (1): b', '  wrong shape (1): a: checkpoint (2,) vs model (4,)']
    assert ck.compare_keys({'a': torch.zeros(2)}, {'a': torch.ones(2)}).problems == ''


def test_an_escaped_slash_in_a_url_cannot_leave_the_cache(cache, tmp_path):
    "`..%2Fname` decodes to `../name`: the cached file is still named `name`, inside the cache."
    (tmp_path/'files'/'sub').mkdir(parents=True)
    (tmp_path/'files'/'labels.txt').write_text('x\n')
    path = download((tmp_path/'files'/'sub').as_uri() + '/..%2Flabels.txt', progress=False)
    assert path == cache/'labels.txt' and path.read_text() == 'x\n'
    assert not (tmp_path/'labels.txt').exists()
    with pytest.raises(CheckpointError, match='names no file'): download((tmp_path/'files').as_uri() + '/sub/..', progress=False)


def test_registry_urls_and_unknown_names(monkeypatch):
    monkeypatch.delenv('UAS_DOWNLOAD_BASE', raising=False)
    monkeypatch.delenv('UAS_LABELMAP_BASE', raising=False)
    base = 'https://github.com/franktpmvu/Universal-Action-Space/releases/download'
    assert ck.registry_url('k600') == f'{base}/Pre-train/swin_base_patch244_window877_kinetics600_22k.pth'
    assert ck.registry_url('mammalnet_k400_uas') == f'{base}/Checkpoints/mammalnet_k400_UAS_epoch_30.pth'
    assert ck.registry_url('k700_diff_train') == f'{base}/Pre-release/k700_diff_train.txt'
    assert ck.registry_url('label_map_k700') == 'https://raw.githubusercontent.com/open-mmlab/mmaction2/main/tools/data/kinetics/label_map_k700.txt'
    assert {'k400', 'k600', 'k700', 'mammalnet_k400_uas', 'chimpbehave_k400_uas', 'chimpbehave_k600_uas', 'chimpbehave_k700_uas',
            'chimpbehave_train', 'chimpbehave_val', 'k700_diff_train', 'k700_diff_val'} <= set(ck.DOWNLOADS)
    with pytest.raises(CheckpointError, match="'k500' is neither a URL nor a registry name"): download('k500')
    with pytest.raises(CheckpointError, match='k500: no such file, and not a URL or a registry name'): load_backbone(swin3d_mini(), 'k500')


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv('UAS_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert ck.cache_dir() == tmp_path/'uas'
    monkeypatch.setenv('UAS_CACHE_DIR', str(tmp_path/'mine'))
    assert ck.cache_dir() == tmp_path/'mine'
