"""Export: a model with reversible stacks exports with default settings (a plain forward)."""

from __future__ import annotations

import io

import pytest
import torch

import revtrain
from revtrain.models import create


def _model_and_input():
    torch.manual_seed(0)
    model = create("revnet_digits")
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()  # a trained-looking model: BN statistics moved, grads present
    return model.eval(), x


def test_torch_export_with_default_settings():
    model, x = _model_and_input()
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    assert revtrain.MemoryMode.REVERSIBLE in {m.memory for m in model.modules()
                                               if isinstance(m, revtrain.ReversibleSequential)}


def test_torch_export_of_a_flow_stack_in_training_mode():
    torch.manual_seed(0)
    stack = revtrain.ReversibleSequential(
        *[revtrain.AffineCoupling(torch.nn.Linear(2, 4), torch.nn.Linear(2, 4)) for _ in range(3)])
    x = torch.randn(5, 4)
    program = torch.export.export(stack, (x,))
    torch.testing.assert_close(program.module()(x), stack(x))


def test_jit_trace():
    model, x = _model_and_input()
    traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), model(x))


def test_onnx_export():
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install onnx)")
    model, x = _model_and_input()
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    assert buffer.getvalue()
