"""Every results table and plot of the benchmarks, formatted in one place: `specdiff bench`
reports (`format_table`, `plot_bench`), the README's end-to-end table over several reports
(`format_e2e_table`, also `benchmarks/e2e_table.py`), and `specdiff eval-drafter` rows
(`format_eval_table`)."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence, Union

__all__ = ["format_table", "plot_bench", "format_e2e_table", "format_eval_table"]


def format_table(report: dict) -> str:
    """A markdown table of a `run_bench` report."""
    head = (f"device: {report['device']}, dtype {report['dtype']}, temperature "
            f"{report['temperature']}, max_new_tokens {report['max_new_tokens']}, "
            f"{report['prompts']} prompts"
            + (f", batch size {report['batch_size']}" if report.get("batch_size", 1) > 1 else "")
            + (" (continuous)" if report.get("continuous") else "")
            + "".join(f", {k} {v}" for k, v in (report.get("controls") or {}).items())
            + (f", specdiff tree budget {report['settings']['tree_budget']}"
               if (report.get("settings") or {}).get("tree_budget") is not None
               and "specdiff" in report["decoders"] else "") + "\n\n")
    greedy = report["temperature"] == 0.0
    cols = ["decoder", "tok/s", "x ar", "accepted/round", "tokens/round", "draft s", "verify s",
            "other s"] + (["matches ar"] if greedy else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, d in report["decoders"].items():
        def f(k: str, fmt: str) -> str:
            return format(d[k], fmt) if k in d else "-"
        row = [name, f("tokens_per_second", ".1f"), f("speedup_vs_ar", ".2f"),
               f("mean_accepted", ".2f"), f("tokens_per_round", ".2f"), f("draft_seconds", ".1f"),
               f("verify_seconds", ".1f"), f("other_seconds", ".1f")]
        if greedy:
            row.append(f"{d['matches_ar']}/{d['prompts']}")
        lines.append("| " + " | ".join(row) + " |")
    return head + "\n".join(lines) + "\n"


def plot_bench(report: dict, path: str) -> None:
    """tokens/s per decoder and the histograms of accepted lengths, as an image."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ModuleNotFoundError("--plot needs matplotlib: `pip install matplotlib`",
                                  name="matplotlib") from exc
    decs = report["decoders"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(decs)
    a1.bar(names, [decs[n]["tokens_per_second"] for n in names], color="tab:blue")
    a1.set_ylabel("tokens / s")
    a1.set_title(f"{report['device']}\n{report['dtype']}, T={report['temperature']}", fontsize=8)
    for n in names:
        h = decs[n].get("accepted_histogram")
        if h:
            tot = sum(h) or 1
            a2.plot(range(len(h)), [c / tot for c in h], marker="o", label=n)
    a2.set_xlabel("draft tokens accepted in a round")
    a2.set_ylabel("fraction of rounds")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ eval-drafter

def format_e2e_table(reports: Sequence[Union[str, dict]]) -> str:
    """The README's end-to-end table from `specdiff bench --out` reports (paths or dicts): one
    row per (temperature, decoder) with tokens/s, the speedups over ar, ar-spec and hf-assisted
    measured in the same run, accepted draft tokens and tokens per round, and at temperature 0
    the prompts whose output equals ar's."""
    reps = [json.load(open(r)) if isinstance(r, str) else r for r in reports]
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


def format_eval_table(rows: List[dict]) -> str:
    """Markdown: one table per (prompt set, temperature, commit), rows G, columns T."""
    out = []
    chain = [r for r in rows if not r.get("tree_budget")]
    keys = sorted({(r["prompts"], r["temperature"], r["commit"]) for r in chain},
                  key=lambda k: (k[0], k[1], k[2]))
    for s, t, c in keys:
        sub = [r for r in chain if (r["prompts"], r["temperature"], r["commit"]) == (s, t, c)]
        Ts = sorted({r["steps"] for r in sub})
        Gs = sorted({r["gamma"] for r in sub})
        out.append(f"**{s}, temperature {t}, commit {c}**: mean accepted draft tokens per round\n")
        out.append("| G \\ T | " + " | ".join(str(T) for T in Ts) + " |")
        out.append("|---|" + "---|" * len(Ts))
        for g in Gs:
            cells = []
            for T in Ts:
                r = next((r for r in sub if r["gamma"] == g and r["steps"] == T), None)
                cells.append(f"{r['mean_accepted']:.2f}" if r else "-")
            out.append(f"| {g} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("| prompts | temperature | G | T | commit | tree | accepted/round | first draft "
               "accepted | rounds | accepted-length histogram | top-1 by position | top-4 by "
               "position |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["temperature"], r["gamma"], r["steps"], r["commit"],
                           r.get("tree_budget", 0)), []).append(r)
    listed = list(rows)
    for (t, g, T, c, b), sub in groups.items():
        if len(sub) > 1:  # all prompt sets pooled
            n = sum(r["rounds"] for r in sub)
            hist = [sum(r["accepted_histogram"][j] for r in sub if j < len(r["accepted_histogram"]))
                    for j in range(max(len(r["accepted_histogram"]) for r in sub))]
            listed.append({"prompts": "all", "temperature": t, "gamma": g, "steps": T, "commit": c,
                           "tree_budget": b, "rounds": n, "accepted_histogram": hist,
                           "mean_accepted": sum(j * h for j, h in enumerate(hist)) / max(n, 1),
                           "first_accept_rate": (n - hist[0]) / max(n, 1),
                           **_pool_positions(sub)})
    for r in listed:
        tree = f"{r['tree_budget']} + n-gram" if r.get("tree_budget") else "chain"
        out.append(f"| {r['prompts']} | {r['temperature']} | {r['gamma']} | {r['steps']} | "
                   f"{r['commit']} | {tree} | {r['mean_accepted']:.2f} | "
                   f"{r.get('first_accept_rate', float('nan')):.2f} | {r['rounds']} | "
                   f"{r['accepted_histogram']} | {_rates(r.get('top1_by_position'))} | "
                   f"{_rates(r.get('top4_by_position'))} |")
    return "\n".join(out)


def _rates(v: Any) -> str:
    """Hit rates by block position k = 1, 2, ..., as 0.62 / 0.41 / ... ('-': none)."""
    if not v:
        return "-"
    return " / ".join("-" if x is None else f"{x:.2f}" for x in v)


def _pool_positions(rows: List[dict]) -> dict:
    """The hit rates by position of several eval-drafter rows pooled (hits over counts)."""
    if not all(r.get("counted_by_position") is not None for r in rows):
        return {}
    G = max(len(r["counted_by_position"]) for r in rows)
    n = [sum(r["counted_by_position"][k] for r in rows if k < len(r["counted_by_position"]))
         for k in range(G)]
    out: Dict[str, Any] = {"counted_by_position": n}
    for key in ("top1_by_position", "top4_by_position"):
        hits = [sum((r[key][k] or 0.0) * r["counted_by_position"][k] for r in rows
                    if k < len(r["counted_by_position"])) for k in range(G)]
        out[key] = [h / c if c else None for h, c in zip(hits, n)]
    return out
