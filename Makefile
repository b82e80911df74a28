# Developer commands. The test suite that CI runs is the README's: `bash .ci/run`.
.PHONY: dev sync readme test figures

# Clean and export the notebooks, refresh README.md from nbs/index.ipynb, run the quick tests (no slow ones).
dev: sync readme
	.venv/bin/nbdev_test
	.venv/bin/pytest tests/ -m "not slow" -q

sync:
	.venv/bin/nbdev_clean
	.venv/bin/nbdev_export

# README.md is nbs/index.ipynb as markdown (quarto, which nbdev_readme needs, is not installable everywhere).
readme:
	.venv/bin/python tests/front_page.py > README.md

test:
	bash .ci/run

# Rewrite figures/ (efficiency.png, efficiency.csv, table_A/B/C.csv) from figures/data and the runs under $$UAS_RUNS (else runs/).
figures:
	.venv/bin/python -c "from uas.tables import write_figures; write_figures('figures')"
