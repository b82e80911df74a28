"Benchmarks run through the command line (`python -m uas.bench`, or its `main` in-process), and write their numbers where `--out_dir` says; data only into folders of their own."
import json, subprocess, sys

import pytest

from uas.bench import main

def run_bench(tmp_path, *args, timeout=900):
    res = subprocess.run([sys.executable, '-m', 'uas.bench', *args, '--out_dir', str(tmp_path)],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith(f'RESULT {args[0]} '), last
    return dict(kv.split('=', 1) for kv in last.split()[2:]), json.loads((tmp_path/f'{args[0]}.json').read_text())

@pytest.mark.slow
def test_synthetic_benchmark(tmp_path):
    headline, data = run_bench(tmp_path, 'synthetic')
    assert data['results']['target']['clips'] > 0 and data['results']['source']['clips'] > 0
    assert float(headline['target_cpu_s']) > 0 and float(headline['source_cpu_s']) > 0


def test_probe_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    "Pointed at a lab's class-folder dataset, the probe benchmark writes nothing there: no clips, lists or class folders."
    lab = tmp_path/'lab'
    (lab/'sitting').mkdir(parents=True)
    (lab/'notes.txt').write_text('our own file\n')
    assert main(['probe', '--quick', '--root', str(lab), '--out_dir', str(tmp_path/'out')]) == 1
    assert f'uas_bench probe: {lab} holds files no benchmark wrote (notes.txt, sitting)' in capsys.readouterr().err
    assert sorted(p.name for p in lab.rglob('*')) == ['notes.txt', 'sitting'] and (lab/'notes.txt').read_text() == 'our own file\n'
    assert not (tmp_path/'out').exists()
