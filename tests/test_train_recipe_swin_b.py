"paper_param_groups on the real Swin-B recognizer (lora and full modes): every trainable parameter's lr and weight decay."
import pytest
import torch

from helpers import paper_rule
from uas.model import build_recognizer, count_parameters
from uas.train import describe_param_groups, paper_param_groups


@pytest.mark.parametrize('mode', ['lora', 'full'])
def test_paper_groups_real_swin_b(mode):
    "Every trainable parameter of the real Swin-B recognizer (103 classes) with its lr and decay, checked against the paper's rule (`helpers.paper_rule`)."
    torch.manual_seed(0)
    model = build_recognizer('swin3d_b', num_classes=103, mode=mode)
    table = describe_param_groups(paper_param_groups(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert table.index.is_unique and sorted(table.index) == sorted(trainable)
    for name, row in table.iterrows():  # every trainable parameter, one by one
        assert (row.lr, row.weight_decay) == pytest.approx(paper_rule(name)), name
    _, num_trainable = count_parameters(model)
    assert table.numel.sum() == num_trainable == {'lora': 1_645_671, 'full': 87_744_559}[mode]
    summary = table.groupby(['lr', 'weight_decay']).numel.agg(['count', 'sum'])
    print(f'\n{mode}:\n{summary}')
    head = table.loc[['cls_head.fc_cls.weight', 'cls_head.fc_cls.bias']]
    assert (head.lr == 3e-4).all() and (head.weight_decay == 0.05).all()
    backbone = table[table.index.str.startswith('backbone.')]
    tables = backbone[backbone.index.str.contains('relative_position_bias_table')]
    rest = backbone.drop(tables.index)
    assert rest.lr.to_numpy() == pytest.approx(3e-5) and (rest.weight_decay == 0.05).all()
    if mode == 'lora':
        assert len(tables) == 0 and rest.index.str.contains(r'\.lora_').all()
        assert len(rest) == 24 * 2 * 2  # q and v adapters (A and B) in each of the 24 blocks
    else:
        assert len(tables) == 24 and (tables.lr == 3e-4).all() and (tables.weight_decay == 0).all()
        norms = rest[rest.index.str.contains('norm')]
        assert len(norms) > 0 and (norms.weight_decay == 0.05).all()
