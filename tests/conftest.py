import os

from hypothesis import settings

# CI runs a fixed set of examples so that a red build always reproduces; locally hypothesis
# explores new examples each run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
