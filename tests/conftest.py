from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# "thousands of random tables": the default profile runs 1000 examples per property; CI keeps the same.
settings.register_profile("default", max_examples=1000, deadline=None)
settings.register_profile("quick", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
