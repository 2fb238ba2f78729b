"""torch.compile readiness: a tiny llama forward traces as one graph (no data-dependent graph break in RoPE)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmcraft.models.rope import RotaryEmbedding


@pytest.mark.slow
def test_tiny_llama_forward_has_no_graph_breaks(tiny_model: Callable[..., torch.nn.Module]) -> None:
    model = tiny_model().eval()
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reserve(model.config.max_position_embeddings)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
