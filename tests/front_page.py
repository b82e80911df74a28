"README.md is nbs/index.ipynb as markdown: `python tests/front_page.py > README.md` (quarto, which `nbdev_readme` needs, cannot be installed everywhere)."
import json
from pathlib import Path

INDEX = Path(__file__).resolve().parent.parent/'nbs'/'index.ipynb'

def render_index(path=INDEX) -> str:
    "The notebook's markdown cells as they are and its code cells as python blocks, in order."
    cells = json.loads(Path(path).read_text())['cells']
    parts = [''.join(c['source']) if c['cell_type'] == 'markdown' else f"```python\n{''.join(c['source'])}\n```"
             for c in cells if not ''.join(c['source']).startswith('#| hide')]
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__': print(render_index(), end='')
