"Benchmarks run from the command line, as a user runs them, and write their numbers where `--out_dir` says."
import json, subprocess, sys

import pytest

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
