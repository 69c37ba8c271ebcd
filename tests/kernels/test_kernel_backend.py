"""dalle_ar.models.attention: the choice of implementation, its logged fallback, and the PyTorch
path's agreement with the fp32 reference (the CPU side of the kernels' contract)."""

from __future__ import annotations

import logging

import pytest
import torch
from dalle_ar.kernels.layouts import CAUSAL_KINDS, LAYOUT_KINDS, Layout
from dalle_ar.kernels.reference import attention_reference, decode_reference

from dalle_ar.models import attention as attn

CUDA = torch.cuda.is_available()


def test_unknown_impl_raises() -> None:
    with pytest.raises(ValueError, match="auto"):
        attn.get_backend("flash")


@pytest.mark.skipif(CUDA, reason="checks the behaviour without CUDA")
def test_auto_without_cuda_falls_back_and_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attn, "_warned", set())
    with caplog.at_level(logging.INFO, logger="dalle_ar.models.attention"):
        assert attn.get_backend("auto").name == "torch"
        assert attn.get_backend("auto").name == "torch"
    said = [r for r in caplog.records if "reference path" in r.getMessage()]
    assert len(said) == 1 and "no CUDA" in said[0].getMessage()
    # the path a machine without CUDA has: said, not warned about on every command
    assert said[0].levelno == logging.INFO
    with pytest.raises(ValueError, match="triton"):
        attn.get_backend("triton")


def test_triton_backend_on_cpu_tensors_uses_pytorch_and_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attn, "_warned", set())
    lay = Layout("row", text_len=3, grid_h=3, grid_w=3)
    q, k, v = torch.randn(3, 1, 2, lay.seq_len, 16, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="dalle_ar.models.attention"):
        out = attn.AttentionBackend("triton")(q, k, v, lay)
    assert torch.allclose(out, attention_reference(q, k, v, lay), atol=1e-5)
    assert any("CPU tensors" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_torch_backend_matches_reference(kind: str) -> None:
    lay = Layout(kind, text_len=4, grid_h=3, grid_w=4, conv_kernel=3)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 2, lay.seq_len, 16, generator=g)
    text_lens = torch.tensor([2, 4])
    backend = attn.get_backend("torch")
    out = backend(q, k, v, lay, text_lens)
    assert torch.allclose(out, attention_reference(q, k, v, lay, text_lens), atol=1e-5)
    lengths = torch.tensor([lay.seq_len, 7])
    q1 = q[:, :, :1]
    if kind not in CAUSAL_KINDS:  # a bidirectional layout has no decode step
        with pytest.raises(ValueError, match="decode steps are for causal layouts"):
            backend.decode(q1, k, v, lengths, lay, text_lens)
        return
    got = backend.decode(q1, k, v, lengths, lay, text_lens)
    assert torch.allclose(got, decode_reference(q1, k, v, lengths, lay, text_lens), atol=1e-5)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_torch_backend_chunk_after_a_prefix_matches_those_rows_of_the_reference(kind: str) -> None:
    lay = Layout(kind, text_len=4, grid_h=3, grid_w=4, conv_kernel=3)
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 2, 2, lay.seq_len, 16, generator=g)
    text_lens = torch.tensor([2, 4])
    out = attn.get_backend("torch")(q[:, :, 4:], k, v, lay, text_lens, q_start=4)
    want = attention_reference(q, k, v, lay, text_lens)[:, :, 4:]
    assert out.shape == want.shape and torch.allclose(out, want, atol=1e-5)
