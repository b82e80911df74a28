"""`torch.compile` takes the backbone whole: no graph breaks, one compilation per input shape, outputs equal to eager.

The compilations use the `aot_eager` backend: dynamo and AOTAutograd trace exactly what inductor would be given,
and the counts are the same, without inductor's minute of C++ compilation per model on a 2-core CPU. Inductor's
outputs and speed are measured by `uas_bench backbone --compile`."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import uas.backbone as bb

torch.set_num_threads(1)  # the test machine is shared: one thread each


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_swin3d_b_has_no_graph_breaks():
    model = bb.swin3d_b().eval()
    with torch.no_grad(): explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 4, 32, 32))  # shifted, padded windows
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_one_compilation_per_shape():
    """Two batches of one shape, one of another: two compilations, outputs as eager. torch's default `dynamic=None`
    traces the second shape with symbolic sizes, which the window plans specialise (`dynamic=False` is the easy case)."""
    model = bb.swin3d_mini().eval()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for shape in [(1, 3, 8, 64, 64), (1, 3, 8, 64, 64), (2, 3, 8, 72, 56)]:  # 4x18x14 tokens: padding in H and W
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=0)
    assert counter.frame_count == 2


def test_compiled_training_with_checkpointing():
    "Train mode, gradient checkpointing in both blocks of a one-stage mini: one graph, the gradients of eager without it."
    torch.manual_seed(0)
    one_stage = dict(depths=(2,), num_heads=(1,), drop_path_rate=0.)  # a plain and a shifted block
    model = bb.swin3d_mini(**one_stage, use_checkpoint=True).train()
    reference = bb.swin3d_mini(**one_stage).train()
    reference.load_state_dict(model.state_dict())
    counter = CompileCounterWithBackend('aot_eager')
    x = torch.randn(1, 3, 8, 64, 64)
    weight = torch.randn(1, 32, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    (torch.compile(model, backend=counter)(x) * weight).sum().backward()
    (reference(x) * weight).sum().backward()
    assert counter.frame_count == 1
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max(), name


def test_reference_path_and_a_graph_break_inside_a_block():
    """The step-by-step reference path compiles as one graph too; and a graph break inside a block (forced here by a
    hook, as an adapter or a user's hook might) splits the graph instead of failing while a mask is live across it."""
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        assert torch._dynamo.explain(bb.swin3d_mini().eval().set_fast(False))(x).graph_break_count == 0
        model = bb.swin3d_mini(depths=(2,), num_heads=(1,)).eval().set_fast(False)  # a plain and a shifted block
        model.layers[0].blocks[1].attn.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
        torch.testing.assert_close(torch.compile(model, backend='aot_eager')(x), model(x), atol=1e-4, rtol=0)
