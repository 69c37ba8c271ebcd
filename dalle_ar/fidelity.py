"""The old module of the fidelity evaluation and the prompt grid; they live in
`dalle_ar.eval.fidelity` and `dalle_ar.grid`."""

from dalle_ar.eval.fidelity import evaluate_fidelity
from dalle_ar.grid import save_prompt_grid

__all__ = ["evaluate_fidelity", "save_prompt_grid"]
