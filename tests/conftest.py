"""Shared test settings: hypothesis profiles and deterministic torch on 2 CPU cores."""
import os

import torch
from hypothesis import HealthCheck, settings

# CI: reproducible draws (derandomize) and bounded example counts so the suite fits on 2 cores.
# dev: random draws and more examples, for hunting counterexamples locally (HYPOTHESIS_PROFILE=dev).
settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
