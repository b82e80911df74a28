"The front page: README.md and nbs/index.ipynb agree, CI runs the README's test command, and the README's main job runs."
import json, re, shlex, subprocess, sys
from pathlib import Path

from conftest import ROOT
from front_page import render_index

def sh_blocks(markdown):
    "The ```sh fenced blocks of a markdown text, in order."
    return [b.strip() for b in re.findall(r'```sh\n(.*?)```', markdown, flags=re.S)]


def readme_commands():
    "The README's commands: the main job, the test suite, opening the notebooks in JupyterLab."
    main_job, test_suite, notebooks = sh_blocks((ROOT/'README.md').read_text())
    return main_job, test_suite

def test_readme_and_index_give_the_same_commands():
    assert sh_blocks((ROOT/'README.md').read_text()) == sh_blocks(render_index()), \
        'README.md and nbs/index.ipynb disagree on the set-up commands: edit the notebook, then `make readme`'

def test_readme_is_the_index_notebook():
    assert (ROOT/'README.md').read_text() == render_index(), \
        'README.md is not nbs/index.ipynb rendered as markdown: edit the notebook, then `make readme`'

def ci_phases():
    "The commands `.ci/run` assigns to its install, notebooks and pytest phases."
    text = (ROOT/'.ci'/'run').read_text()
    return [shlex.split(re.search(rf"^{name}=(.*)$", text, flags=re.M).group(1))[0]
            for name in ('INSTALL', 'NOTEBOOKS', 'PYTEST')]

def test_ci_runs_exactly_the_readme_test_command():
    _, test_suite = readme_commands()
    assert ' && '.join(ci_phases()) == test_suite

def test_test_command_runs_every_notebook_and_every_test():
    _, test_suite = readme_commands()
    assert 'nbdev_test --flags slow' in test_suite and '--path' not in test_suite
    assert test_suite.endswith('pytest tests/'), 'pytest must run all of tests/, without deselection'

def test_readme_main_job_runs(tmp_path):
    "Run the README's main job (its commands after the install) with this environment's scripts."
    main_job, _ = readme_commands()
    steps = [s.strip() for s in main_job.split('&&')]
    job = [s for s in steps if not s.startswith('python3 -m venv') and 'pip install' not in s]
    assert job, f'no main-job command after the install in {main_job!r}'
    bindir = Path(sys.executable).parent
    for step in job:
        args = shlex.split(step.replace('.venv/bin/', f'{bindir}/'))
        if Path(args[0]).name == 'uas_demo': args += ['--quick', '--work-dir', str(tmp_path/'demo'), '--no-progress']
        res = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert res.returncode == 0, res.stderr
        assert 'UAS head, mini space' in res.stdout and (tmp_path/'demo'/'results.csv').exists(), res.stdout

def test_readme_opens_the_notebooks_with_the_notebooks_extra():
    "The JupyterLab command installs the extra that settings.ini defines, with the constraints, and opens nbs/."
    notebooks = sh_blocks((ROOT/'README.md').read_text())[2]
    install, lab = [s.strip() for s in notebooks.split('&&')]
    assert shlex.split(install) == ['.venv/bin/pip', 'install', '-c', 'constraints.txt', '-e', '.[dev,notebooks]']
    assert shlex.split(lab) == ['.venv/bin/jupyter', 'lab', 'nbs/']
    settings = (ROOT/'settings.ini').read_text()
    extra = re.search(r'^notebooks_requirements = (.*)$', settings, flags=re.M).group(1).split()
    assert {r.split('>')[0] for r in extra} == {'jupyterlab', 'ipykernel'}
    assert "'notebooks': notebooks_requirements" in (ROOT/'setup.py').read_text()

def test_python_dash_m_bench_dispatches(tmp_path):
    res = subprocess.run([sys.executable, '-m', 'uas.bench', 'env', '--out_dir', str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith('RESULT env torch=')
    assert json.loads((tmp_path/'env.json').read_text())['results']['video_backends']['pyav'] == 'ok'
    bad = subprocess.run([sys.executable, '-m', 'uas.bench', 'no-such-benchmark'], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and 'usage: uas_bench NAME' in bad.stderr
