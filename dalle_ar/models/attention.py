"""The one place that chooses how attention runs: the project's Triton kernels or the PyTorch
reference with the identical mask.

The choice (`auto | triton | torch`) is made when a model is built, never at import. `auto` takes
Triton on CUDA when it is installed; when it cannot, the fallback is logged once.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from dalle_ar.kernels.layouts import CAUSAL_KINDS, Layout
from dalle_ar.kernels.reference import attention_sdpa, decode_sdpa

log = logging.getLogger(__name__)
_warned: set[str] = set()

IMPLS = ("auto", "triton", "torch")


def _warn_once(msg: str, level: int = logging.WARNING) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.log(level, msg)


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """Callable attention for one implementation.

    `backend(q, k, v, layout, text_lens)`: positions 0..N-1 attend to keys 0..N-1 (training and
    prefill); with `q_start` > 0, queries q_start..N-1 of a chunk after a cached prefix, q (B, H,
    N - q_start, D).
    `backend.decode(q, k_cache, v_cache, lengths, layout, text_lens)`: one query per
    sequence at position lengths-1 against a static KV cache. Shapes (B, H, N, D).
    """

    name: str  # "triton" or "torch"

    def _triton_for(self, q: torch.Tensor) -> bool:
        """Whether this call runs the Triton kernels (they need CUDA tensors; said once if not)."""
        if self.name != "triton":
            return False
        if not q.is_cuda:
            _warn_once("attention: Triton backend got CPU tensors; using the PyTorch path")
        return q.is_cuda

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: Layout,
        text_lens: torch.Tensor | None = None,
        q_start: int = 0,
    ) -> torch.Tensor:
        if self._triton_for(q):
            from dalle_ar.kernels.attention import attention

            return attention(q, k, v, layout, text_lens, q_start=q_start)
        return attention_sdpa(q, k, v, layout, text_lens, q_start)

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lengths: torch.Tensor,
        layout: Layout,
        text_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if layout.kind not in CAUSAL_KINDS:  # one new query against a cache of earlier keys
            raise ValueError(f"decode steps are for causal layouts {CAUSAL_KINDS}, got "
                             f"{layout.kind!r} (a masked generator's passes cover the whole "
                             "image)")  # fmt: skip
        if self._triton_for(q):
            from dalle_ar.kernels.decode import decode_attention

            return decode_attention(q, k_cache, v_cache, lengths, layout, text_lens)
        return decode_sdpa(q, k_cache, v_cache, lengths, layout, text_lens)


def triton_available() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import triton  # noqa: F401

        from dalle_ar.kernels import attention as _  # noqa: F401
    except Exception as e:  # an import failure of any kind means: not here
        return False, f"Triton kernels unavailable ({type(e).__name__}: {e})"
    return True, ""


def get_backend(impl: str = "auto", device: torch.device | str | None = None) -> AttentionBackend:
    """Pick the implementation for a model about to run on `device`."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return AttentionBackend("torch")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    ok, why = triton_available()
    if impl == "triton":
        if not ok:
            raise ValueError(f"attention impl 'triton' requested but {why}")
        return AttentionBackend("triton")
    if ok and (device is None or on_cuda):
        return AttentionBackend("triton")
    # on a machine without CUDA it is the path there is: said at INFO, not as a warning on
    # every command; a GPU the kernels cannot run on, or a model kept off it, is warned about
    expected = not torch.cuda.is_available()
    _warn_once(f"attention: using the PyTorch reference path ({why or 'model is not on CUDA'})",
               logging.INFO if expected else logging.WARNING)  # fmt: skip
    return AttentionBackend("torch")
