import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# dev: fast feedback, failures print a reproduction blob; ci: reproducible (same examples every run).
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=40)
settings.register_profile(
    "ci",
    deadline=None,
    print_blob=True,
    derandomize=True,
    database=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
