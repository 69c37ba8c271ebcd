"""A version-1 pipeline folder (tests/fixtures/pipeline_v1: mask input, code features, saved before
the drawn masks were stored) still loads and draws the very codes it drew when it was made
(tests/fixtures/pipeline_v1_codes.json: per case the prompts, the call's keyword arguments and the
codes)."""

from __future__ import annotations

import json

import pytest
from _pipeline_fixtures import V1_CODES, V1_PIPELINE

from dalle_ar.pipeline import DalleAR

CASES = json.loads((V1_CODES).read_text())


@pytest.fixture(scope="module")
def pipe_v1() -> DalleAR:
    return DalleAR.from_pretrained(V1_PIPELINE)


@pytest.mark.parametrize("case", sorted(CASES))
def test_v1_folder_draws_the_recorded_codes(pipe_v1, case):
    rec = CASES[case]
    assert pipe_v1(rec["prompts"], **rec["kwargs"]).codes.tolist() == rec["codes"]
