"""The README's end-to-end table from `specdiff bench --out` reports (formatted by
`specdiff_ext.bench.format_e2e_table`, where every results table is formatted).

    python benchmarks/e2e_table.py benchmarks/results/e2e_cpu_bf16_t0.json benchmarks/results/e2e_cpu_bf16_t1.json
"""

from __future__ import annotations

import sys

from specdiff_ext.bench import format_e2e_table

if __name__ == "__main__":
    print(format_e2e_table(sys.argv[1:]))
