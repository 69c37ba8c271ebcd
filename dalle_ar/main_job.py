"""The old module of the main job; it lives in `dalle_ar.jobs` (`main`, `config`, `plan`,
`stages`, `run`)."""

from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.main import main, run_stages
from dalle_ar.jobs.stages import Paths

__all__ = ["MainJobConfig", "Paths", "main", "run_stages"]
