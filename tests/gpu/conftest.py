"""GPU test defaults: every model, however narrow, exercises the tensor-core product."""

import os

# The engine keeps narrow models (hidden < 768, the shapes these tests shrink
# models to) off the tensor-core product by default; the tests cover that
# path on every architecture and weight type, so they start it at 4 tokens
# unless the caller's environment chooses (tools/gpu_bench.py --tc-min does).
os.environ.setdefault("HELEXA_TC_MIN", "4")
