"Fresh-install checks: the package builds, carries every module and console script, and runs outside the checkout."
import json, os, subprocess, sys, zipfile

import pytest
from conftest import ROOT

@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    return next(out.glob('uas-*.whl'))

def test_wheel_holds_every_exported_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f'uas/{p.name}' for p in (ROOT/'uas').glob('*.py')}
    assert modules <= names, modules - names

def test_wheel_metadata(wheel):
    z = zipfile.ZipFile(wheel)
    meta = z.read(next(n for n in z.namelist() if n.endswith('METADATA'))).decode()
    assert 'Requires-Python: >=3.11' in meta
    assert 'Requires-Dist: decord>=0.6; sys_platform != "darwin" or platform_machine != "arm64"' in meta
    assert 'Requires-Dist: av>=18.1' in meta
    assert 'Requires-Dist: omegaconf>=2.3' in meta
    runtime = [l for l in meta.splitlines() if l.startswith('Requires-Dist:') and 'extra ==' not in l]
    assert not [l for l in runtime if 'nbdev' in l or 'execnb' in l], 'the nbdev pins belong to the dev extra'
    assert 'Requires-Dist: nbdev<3,>=2.4; extra == "dev"' in meta
    for dev in ('nbclient>=0.10', 'ipykernel>=6.29'): assert f'Requires-Dist: {dev}; extra == "dev"' in meta, dev
    for nb in ('jupyterlab>=4.2', 'ipykernel>=6.29'): assert f'Requires-Dist: {nb}; extra == "notebooks"' in meta, nb
    entry = z.read(next(n for n in z.namelist() if n.endswith('entry_points.txt'))).decode()
    assert 'uas_bench = uas.bench:main' in entry
    assert 'uas_split = uas.config:uas_split' in entry and 'uas_check = uas.config:uas_check' in entry
    for script in ('uas_train = uas.cli:train_main', 'uas_test = uas.cli:test_main', 'uas_extract = uas.cli:extract_main',
                   'uas_predict = uas.cli:predict_main', 'uas_demo = uas.demo:demo_main', 'uas_mini_space = uas.mini:mini_space_main',
                   'uas_timeline = uas.timeline:timeline_main', 'uas_reproduce = uas.tables:reproduce_main'):
        assert script in entry, script

def test_constraints_pin_the_kernel_and_jupyterlab():
    "The notebooks extra and the kernel of the dev extra install the versions they were tested with."
    pins = dict(l.split('==') for l in (ROOT/'constraints.txt').read_text().splitlines() if '==' in l and not l.startswith('#'))
    for name in ('jupyterlab', 'ipykernel', 'nbclient', 'nbformat', 'jupyter_client', 'pyzmq', 'tornado'): assert name in pins, name

def test_wheel_ships_the_mini_action_space(wheel):
    assert 'uas/spaces/mini.pth' in zipfile.ZipFile(wheel).namelist()

@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    "Install the wheel alone into a folder and run a benchmark and the quick demo from elsewhere (the demo finds the shipped space)."
    site = tmp_path/'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    work = tmp_path/'work'; work.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(site)}
    res = subprocess.run([sys.executable, '-c', 'import uas, sys; print(uas.__file__); sys.exit(__import__("uas.bench").bench.main(["env"]))'],
                         capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith(str(site))
    assert (work/'figures'/'data'/'env.json').exists()
    demo = subprocess.run([sys.executable, '-c', 'import sys; from uas.demo import demo_main; sys.exit(demo_main())', '--quick',
                           '--work-dir', 'demo', '--no-progress'], capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert 'UAS head, mini space' in demo.stdout and (work/'demo'/'efficiency.png').exists()
    origin = json.loads((work/'demo'/'runs'/'uas_head'/'record.json').read_text())['pretrained']
    assert origin['source'] == 'mini', origin  # the shipped space, found in the installed package
