"""`python -m lpq.prefetch`: do once, at setup, what a first run would otherwise spend minutes on:
convert the built-in SmolLM2-135M (its PyPI wheel) and build the C++ kernels for this CPU."""
from __future__ import annotations

import sys
import time


def main() -> int:
    from lpq import cpu_numerics

    cpu_numerics.pin()
    from lpq.formats._build import load_kernel, why_unavailable
    from lpq.models.hub import smollm2_dir

    t0 = time.perf_counter()
    print(f"lpq: SmolLM2-135M-Instruct in {smollm2_dir()}", file=sys.stderr)
    missing = []
    for family in ("hif8", "hif4", "mx", "fwht"):
        if load_kernel(family) is None:
            missing.append(f"{family} ({why_unavailable(family)})")
    print(f"lpq: C++ kernels {'built' if not missing else 'missing: ' + ', '.join(missing)}; "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
