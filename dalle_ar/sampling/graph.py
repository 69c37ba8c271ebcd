"""One decode step captured in a CUDA graph and replayed per position (`generate_image_tokens`
with cuda_graph): a step then costs one launch instead of hundreds."""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedStep:
    """`fn(last, pos, u_j)` captured in a CUDA graph at its first call and replayed after: the
    arguments are copied into static buffers, and the result is a static buffer that the next
    replay overwrites (the caller copies it out first). The first call runs fn eagerly on a side
    stream (kernel compilation, the allocator, the cache tables) and returns that result; the
    capture that follows records the step without running it. The capture is thread-local, so
    other threads (a data loader pinning memory, say) may use CUDA meanwhile."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.out: torch.Tensor | None = None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            for buf, a in zip(self.inputs, args):
                buf.copy_(a)
            self.graph.replay()
            return self.out
        self.inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = self.fn(*self.inputs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.out = self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        first.record_stream(torch.cuda.current_stream())
        self.graph = graph
        return first
