"The recognizer (uas.model): the paper's trainable counts on Swin-B, modes, gradients, memory, heads, model files."
import json, subprocess, sys, textwrap

import pytest
import torch
from torch import nn

from helpers import saved_bytes, write_ramp
from uas.backbone import swin3d_mini
from uas.checkpoint import CheckpointError, load_backbone
from uas.lora import is_lora_name
from uas.model import (KineticsHead, UASHead, backbone_hash, build_recognizer, count_parameters, load_model,
                       load_trainable, model_file_differences, model_pipeline, parameter_table, pipeline_spec, save_trainable,
                       set_mode, trainable_parameters)
from uas.video import get_pipeline

torch.set_num_threads(1)
CLIP = torch.randn(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('num_classes, mode, trainable', [
    (12, 'uas', 12_300),          # MammalNet, K400 backbone
    (7, 'uas', 7_175),            # ChimpBehave
    (103, 'uas', 105_575),        # K700-diff
    (103, 'lora', 1_645_671),     # K700-diff, LoRA r = 32 on q and v of all 24 blocks
    (103, 'full', 87_744_559),    # K700-diff, full fine-tuning (the paper's table prints 87,744.66K)
])
def test_paper_trainable_counts_on_swin_b(num_classes, mode, trainable):
    model = build_recognizer('swin3d_b', num_classes, mode)
    total, n = count_parameters(model)
    assert n == trainable
    assert total == 87_638_984 + 1024 * num_classes + num_classes + (1_540_096 if mode == 'lora' else 0)
    assert parameter_table(model).loc['total', 'trainable'] == trainable


def mini_checkpoint(seed=0, classes=400):
    "An official-layout checkpoint of a random swin3d_mini, with a Kinetics-style head of `classes` classes."
    torch.manual_seed(seed)
    sd = {f'backbone.{k}': v for k, v in swin3d_mini().state_dict().items()}
    return {'state_dict': {**sd, 'cls_head.fc_cls.weight': torch.randn(classes, 256), 'cls_head.fc_cls.bias': torch.randn(classes)},
            'meta': {'epoch': 30}}


@pytest.mark.parametrize('mode', ['uas', 'lora', 'full'])
@pytest.mark.parametrize('backbone_train_mode', [True, False])
def test_one_backward_reaches_exactly_the_trainable_set(mode, backbone_train_mode):
    model = build_recognizer('swin3d_mini', 7, mode, pretrained=mini_checkpoint(), lora_rank=4,
                             backbone_train_mode=backbone_train_mode).train()
    optimiser = torch.optim.AdamW(trainable_parameters(model).values(), lr=3e-4)
    nn.functional.cross_entropy(model(CLIP), torch.tensor([3])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable_parameters(model))
    assert {id(p) for g in optimiser.param_groups for p in g['params']} == {id(p) for p in trainable_parameters(model).values()}
    expected = {'uas': lambda n: n.startswith('cls_head.'), 'full': lambda n: True,
                'lora': lambda n: n.startswith('cls_head.') or is_lora_name(n)}[mode]
    assert with_grad == {n for n, _ in model.named_parameters() if expected(n)}
    assert 'kinetics_head.weight' in model.state_dict() and not any(n.startswith('kinetics_head') for n in with_grad)
    optimiser.step()


def test_frozen_backbone_keeps_no_activation_graph():
    uas = build_recognizer('swin3d_mini', 7, 'uas', backbone_train_mode=False).train()
    saved, scores = saved_bytes(uas, CLIP)
    assert saved == 256 * 4                        # only the pooled features the head multiplies, float32
    assert scores.grad_fn is not None
    full = build_recognizer('swin3d_mini', 7, 'full').train()
    assert saved_bytes(full, CLIP)[0] > 10_000 * saved    # the same clip through a trainable backbone: megabytes
    # the reference's train-mode frozen backbone records nothing either (drop path draws, but no graph)
    assert saved_bytes(build_recognizer('swin3d_mini', 7, 'uas').train(), CLIP)[0] == 256 * 4


def test_backbone_train_mode():
    torch.manual_seed(0)
    ref = build_recognizer('swin3d_mini', 7, 'uas', pretrained=mini_checkpoint(), drop_path_rate=0.5).train()
    assert ref.backbone.training and ref.cls_head.training
    with torch.no_grad(): assert not torch.equal(ref.extract_feat(CLIP), ref.extract_feat(CLIP))   # drop path active
    det = build_recognizer('swin3d_mini', 7, 'uas', pretrained=mini_checkpoint(), drop_path_rate=0.5, backbone_train_mode=False).train()
    assert not det.backbone.training and det.cls_head.training
    with torch.no_grad():
        assert torch.equal(det.extract_feat(CLIP), det.extract_feat(CLIP))
        assert torch.equal(det.extract_feat(CLIP), ref.eval().extract_feat(CLIP))


def test_kinetics_head_is_kept_frozen_and_never_trains():
    ckpt = mini_checkpoint(classes=600)
    model = build_recognizer('swin3d_mini', 12, 'full', pretrained=ckpt)
    assert isinstance(model.kinetics_head, KineticsHead) and model.kinetics_head.num_classes == 600
    assert torch.equal(model.kinetics_head.weight, ckpt['state_dict']['cls_head.fc_cls.weight'])
    model.requires_grad_(True)                       # even a blanket unfreeze cannot reach it
    assert not any(n.startswith('kinetics_head') for n in trainable_parameters(model))
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(CLIP)
        expected = feats.mean((2, 3, 4)) @ ckpt['state_dict']['cls_head.fc_cls.weight'].T + ckpt['state_dict']['cls_head.fc_cls.bias']
        torch.testing.assert_close(model.kinetics_scores(CLIP), expected)
    assert model.load_report.head.num_classes == 600
    with pytest.raises(AttributeError, match='no Kinetics head'): build_recognizer('swin3d_mini', 7).kinetics_scores(CLIP)


def test_a_trained_task_head_loads_into_the_task_head():
    ckpt = mini_checkpoint(classes=7)                # like the paper's chimpbehave_k400_uas checkpoints
    model = build_recognizer('swin3d_mini', 7, 'uas', pretrained=ckpt)
    assert not hasattr(model, 'kinetics_head')
    assert torch.equal(model.cls_head.fc_cls.weight.detach(), ckpt['state_dict']['cls_head.fc_cls.weight'])
    with pytest.raises(ValueError, match=r'\(7, 256\).*pass num_classes=7'): build_recognizer('swin3d_mini', 12, pretrained=ckpt)
    assert build_recognizer('swin3d_mini', 12, pretrained=ckpt, head='kinetics').kinetics_head.num_classes == 7


def test_head_init_and_inputs():
    torch.manual_seed(0)
    head = UASHead(1024, 103)
    assert isinstance(head.fc_cls, nn.Linear) and head.dropout.p == 0.5
    assert torch.count_nonzero(head.fc_cls.bias) == 0
    assert abs(head.fc_cls.weight.std().item() - 0.01) < 5e-4
    head.eval()
    fmap = torch.randn(3, 1024, 2, 7, 7)
    with torch.no_grad(): torch.testing.assert_close(head(fmap), head(fmap.mean((2, 3, 4))))
    with pytest.raises(ValueError, match=r'got shape \(3, 1024, 2\)'): head(torch.randn(3, 1024, 2))


def test_views_and_lora_start_equal_to_uas():
    uas = build_recognizer('swin3d_mini', 7, 'uas', pretrained=mini_checkpoint()).eval()
    lora = build_recognizer('swin3d_mini', 7, 'lora', pretrained=mini_checkpoint(), lora_rank=4).eval()
    lora.cls_head.load_state_dict(uas.cls_head.state_dict())
    views = torch.randn(2, 2, 3, 8, 64, 64)
    with torch.no_grad():
        scores = uas(views)
        assert scores.shape == (2, 2, 7)
        torch.testing.assert_close(scores[1, 0], uas(views[1, 0:1])[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(lora(views[:, 0]), uas(views[:, 0]))          # B = 0: LoRA starts as the frozen model
    with pytest.raises(ValueError, match='clips must be'): uas(torch.randn(3, 8, 64, 64))


def test_set_mode_and_errors():
    model = build_recognizer('swin3d_mini', 7, 'full')
    assert count_parameters(set_mode(model, 'uas'))[1] == 7 * 256 + 7 and model.mode == 'uas'
    with pytest.raises(ValueError, match='call add_lora first'): set_mode(model, 'lora')
    with pytest.raises(ValueError, match="mode must be one of"): build_recognizer('swin3d_mini', 7, 'linear-probe')
    with pytest.raises(ValueError, match="unknown arch 'swin3d_xl'"): build_recognizer('swin3d_xl', 7)


def randomise(model, std=0.05):
    "Give every trainable parameter random values, as training would; returns `model` in eval mode."
    with torch.no_grad():
        for p in trainable_parameters(model).values(): p.normal_(std=std)
    return model.eval()


def test_save_and_load_only_the_trainable_weights(tmp_path):
    for mode, limit in [('uas', 20_000), ('lora', 200_000)]:
        model = randomise(build_recognizer('swin3d_mini', 7, mode, pretrained=mini_checkpoint(), lora_rank=4))
        with torch.no_grad(): expected = model(CLIP)
        path = save_trainable(model, tmp_path / f'{mode}.pth')
        assert path.stat().st_size < limit
        again = build_recognizer('swin3d_mini', 7, mode, pretrained=mini_checkpoint(), lora_rank=4).eval()
        with torch.no_grad(): assert not torch.equal(again(CLIP), expected)
        load_trainable(again, path)
        with torch.no_grad(): assert torch.equal(again(CLIP), expected)
        assert set(torch.load(path, weights_only=True)['state_dict']) == set(trainable_parameters(model))
    with pytest.raises(CheckpointError, match='mode: the file has uas, the model lora'):
        load_trainable(build_recognizer('swin3d_mini', 7, 'lora', pretrained=mini_checkpoint(), lora_rank=4), tmp_path / 'uas.pth')
    with pytest.raises(CheckpointError, match=r"LoRA settings: the file has \{'rank': 4"):
        load_trainable(build_recognizer('swin3d_mini', 7, 'lora', pretrained=mini_checkpoint(), lora_rank=8), tmp_path / 'lora.pth')


def test_a_head_refuses_another_backbone_or_class_count_and_an_old_file_warns(tmp_path):
    model = randomise(build_recognizer('swin3d_mini', 7, 'uas', pretrained=mini_checkpoint(seed=0)))
    path = save_trainable(model, tmp_path / 'head.pth')
    other = build_recognizer('swin3d_mini', 7, 'uas', pretrained=mini_checkpoint(seed=1))
    with pytest.raises(CheckpointError) as e: load_trainable(other, path)
    assert backbone_hash(model.backbone) in str(e.value) and backbone_hash(other.backbone) in str(e.value)
    assert torch.count_nonzero(other.cls_head.fc_cls.bias) == 0                      # refused before anything was copied
    with pytest.raises(CheckpointError, match='class count: the file has 7, the model 5'):
        load_trainable(build_recognizer('swin3d_mini', 5, 'uas', pretrained=mini_checkpoint(seed=0)), path)
    meta = torch.load(path, weights_only=True)['uas_model']
    assert model_file_differences(model, dict(meta, arch='swin3d_t')) == ['architecture: the file has swin3d_t, the model swin3d_mini']
    # a file as save_trainable wrote it before model files described themselves
    old = {'state_dict': {k: v.detach().clone() for k, v in trainable_parameters(model).items()}, 'meta': {'mode': 'uas', 'lora': None}}
    torch.save(old, tmp_path / 'old.pth')
    again = build_recognizer('swin3d_mini', 7, 'uas', pretrained=mini_checkpoint(seed=0)).eval()
    with pytest.warns(UserWarning, match='old.pth was written before model files described themselves: it cannot be checked'):
        load_trainable(again, tmp_path / 'old.pth')
    with torch.no_grad(): assert torch.equal(again(CLIP), model(CLIP))
    with pytest.raises(CheckpointError, match='cannot rebuild a model'): load_model(tmp_path / 'old.pth')


REBUILD = textwrap.dedent("""
    import sys, torch
    from uas.model import load_model, model_pipeline
    torch.set_num_threads(1)
    model = load_model(sys.argv[1])
    with torch.no_grad(): scores = model(model_pipeline(model)(sys.argv[2])[None])
    torch.save({'scores': scores, 'classes': model.classes, 'training': model.training}, sys.argv[3])
""")


def test_a_model_file_alone_rebuilds_the_recognizer_in_a_new_process(tmp_path):
    torch.save(mini_checkpoint(), tmp_path / 'backbone.pth')
    model = randomise(build_recognizer('swin3d_mini', 3, 'lora', pretrained=tmp_path / 'backbone.pth', lora_rank=4))
    pipeline = dict(name='chimpbehave_test', clip_len=8, short_side=32, crop_size=32)
    path = save_trainable(model, tmp_path / 'model.pth', classes=['sitting', 'walking', 'hanging'], pipeline=pipeline)
    video = write_ramp(tmp_path / 'clip.mp4', n=8, size=32)
    with torch.no_grad(): expected = model(get_pipeline(**pipeline)(video)[None])
    res = subprocess.run([sys.executable, '-c', REBUILD, str(path), str(video), str(tmp_path / 'scores.pth')],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / 'scores.pth', weights_only=True)
    assert got['classes'] == ['sitting', 'walking', 'hanging'] and not got['training']
    assert got['scores'].shape == (1, 3, 3)                                    # 1 video, 3 crops, 3 classes
    torch.testing.assert_close(got['scores'], expected, rtol=0, atol=1e-6)
    meta = torch.load(path, weights_only=True)['uas_model']
    assert meta['backbone'] == dict(source=str((tmp_path / 'backbone.pth').resolve()), note='', sha256=backbone_hash(model.backbone))
    assert json.loads(json.dumps(meta)) == meta                                # plain data only
    assert meta['pipeline']['kwargs'] == dict(clip_len=8, short_side=32, crop_size=32) and meta['pipeline']['views'] == 3


def test_a_backbone_no_file_holds_is_recorded_by_hash_and_needs_the_callers_weights(tmp_path):
    model = randomise(build_recognizer('swin3d_mini', 3, 'uas'))             # random weights: no file gives them again
    path = save_trainable(model, tmp_path / 'head.pth')
    meta = torch.load(path, weights_only=True)['uas_model']['backbone']
    assert meta == dict(source=None, note='random weights', sha256=backbone_hash(model.backbone))
    with pytest.raises(CheckpointError, match=f"random weights, SHA-256 {meta['sha256']}.*pretrained="): load_model(path)
    rebuilt = load_model(path, pretrained=model.backbone.state_dict())
    with torch.no_grad(): assert torch.equal(rebuilt(CLIP), model(CLIP))
    with pytest.raises(CheckpointError, match=meta['sha256']): load_model(path, pretrained=swin3d_mini().state_dict())
    # a frozen backbone that changed after it was loaded no longer has the loaded source
    torch.save(mini_checkpoint(), tmp_path / 'backbone.pth')
    changed = build_recognizer('swin3d_mini', 3, 'uas', pretrained=tmp_path / 'backbone.pth')
    with torch.no_grad(): changed.backbone.norm.bias.add_(1.)
    saved = torch.load(save_trainable(changed, tmp_path / 'changed.pth'), weights_only=True)['uas_model']['backbone']
    assert saved['source'] is None and saved['sha256'] == backbone_hash(changed.backbone)


def test_a_full_model_file_holds_every_weight_and_its_starting_backbone(tmp_path):
    start = build_recognizer('swin3d_mini', 3, 'full', pretrained=mini_checkpoint(classes=400))
    started_from = backbone_hash(start.backbone)
    model = randomise(start, std=0.02)                                         # every weight changes, as fine-tuning's would
    path = save_trainable(model, tmp_path / 'full.pth', classes=['a', 'b', 'c'])
    saved = torch.load(path, weights_only=True)
    assert set(saved['state_dict']) == {k for k in model.state_dict() if not k.startswith('kinetics_head.')}
    assert saved['uas_model']['backbone']['sha256'] == started_from != backbone_hash(model.backbone)    # provenance
    rebuilt = load_model(path)
    with torch.no_grad(): assert torch.equal(rebuilt(CLIP), model(CLIP))
    assert rebuilt.backbone_origin['sha256'] == started_from and rebuilt.classes == ['a', 'b', 'c']
    with pytest.raises(ValueError, match='no test pipeline'): model_pipeline(rebuilt)
    report = load_backbone(swin3d_mini(), path)                                # also an official-layout checkpoint
    assert report.head.num_classes == 3 and report.skipped == ['uas_model']


def test_parameter_table_groups():
    table = parameter_table(build_recognizer('swin3d_mini', 7, 'lora', lora_rank=4))
    assert list(table.columns) == ['parameters', 'trainable']
    assert table.loc['cls_head', 'trainable'] == 7 * 256 + 7
    assert table.loc['backbone.layers.0', 'trainable'] == 0
    assert table.loc['backbone.layers.0 (LoRA)', 'trainable'] == 2 * 2 * 2 * 4 * 32       # 2 blocks, q+v, A+B, r*C
    assert table.loc['total', 'parameters'] == table.drop('total')['parameters'].sum()


def test_a_pipeline_that_builds_differently_now_is_a_warning():
    "A model file's test pipeline is rebuilt from its name and keywords; if that no longer gives what was saved, say so."
    model = build_recognizer('swin3d_mini', 7, 'uas')
    model.pipeline_spec = dict(pipeline_spec('chimpbehave_test'), description='Pipeline(an older chimpbehave_test)')
    with pytest.warns(UserWarning, match='an older chimpbehave_test'): pipeline = model_pipeline(model)
    assert repr(pipeline) == pipeline_spec('chimpbehave_test')['description']
