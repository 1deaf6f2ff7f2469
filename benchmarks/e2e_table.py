"""The README's end-to-end table from `specdiff bench --out` reports.

    python benchmarks/e2e_table.py benchmarks/results/e2e_cpu_bf16_t0.json benchmarks/results/e2e_cpu_bf16_t1.json

One row per (temperature, decoder): tokens/s, speedup over ar, over ar-spec and over Hugging
Face assisted generation (all measured in the same run), accepted draft tokens and tokens per
round, and at temperature 0 the prompts whose output equals ar's.
"""

from __future__ import annotations

import json
import sys


def table(paths: list) -> str:
    reps = [json.load(open(p)) for p in paths]
    r0 = reps[0]
    s = r0.get("settings", {})
    out = [f"{r0['device']}, {r0['dtype']}, batch 1, {r0['prompts']} held-out prompts "
           f"({s.get('prompts', '?')}: HumanEval and held-out ShareGPT), {r0['max_new_tokens']} "
           f"new tokens; specdiff G={s.get('gamma')} T={s.get('steps')} {s.get('commit')}, "
           f"ar-spec and hf-assisted {s.get('ar_gamma')} drafts per round.", "",
           "| T | decoder | tok/s | x ar | x ar-spec | x hf-assisted | accepted/round | "
           "tokens/round | same as ar |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reps:
        d = r["decoders"]

        def ratio(name: str, other: str) -> str:
            if other not in d or name not in d:
                return "-"
            return f"{d[name]['tokens_per_second'] / d[other]['tokens_per_second']:.2f}"

        for name, v in d.items():
            acc = f"{v['mean_accepted']:.2f}" if "mean_accepted" in v else "-"
            tpr = f"{v['tokens_per_round']:.2f}" if "tokens_per_round" in v else "-"
            same = f"{v['matches_ar']}/{v['prompts']}" if "matches_ar" in v else "-"
            out.append(f"| {r['temperature']:g} | {name} | {v['tokens_per_second']:.1f} | "
                       f"{ratio(name, 'ar')} | {ratio(name, 'ar-spec')} | "
                       f"{ratio(name, 'hf-assisted')} | {acc} | {tpr} | {same} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1:]))
