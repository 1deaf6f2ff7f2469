"""Does the drafter's own score predict a tree's acceptance? For each round of the default pair
(tree budget 16, 12 default prompts x 64 tokens, 1 thread), E = sum over tree nodes of the
product of the drafter's probabilities along the path, against the drafts accepted; prints
the mean accepted per bin of E. Argument: the temperature.

    PYTHONPATH=. python benchmarks/tree_score_cpu.py 0
"""
import sys, torch, math
from specdiff_ext.pretrained import load_pair
from specdiff_ext.decoding import SpecDiffDecoder
from specdiff_ext.prompts import default_prompts
from specdiff_ext.drafting import tree as treemod
torch.set_num_threads(1)
T = float(sys.argv[1])
pair = load_pair(dtype=torch.float32)
tgt = pair.target
dec = SpecDiffDecoder(tgt, pair.drafter, tree_budget=16)
prompts = [tgt.chat_prompt(p) for p in default_prompts(12)]
rec = []
orig = treemod.best_first_tree
cur = {}
def bft(tree, logprobs, ids, budget):
    n0 = tree.size()
    orig(tree, logprobs, ids, budget)
    # recompute scores of created drafter nodes: path logprob sum
    lp = logprobs.tolist(); tk = ids.tolist()
    sc = []
    for node in range(1, len(tree.tokens)):
        # depth and path
        path = []; x = node
        while x > 0: path.append(x); x = tree.parents[x]
        path = path[::-1]
        s = 0.0; ok = True
        for d, nd in enumerate(path):
            if d >= len(tk): ok = False; break
            r = tk[d].index(tree.tokens[nd]) if tree.tokens[nd] in tk[d] else None
            if r is None: ok = False; break
            s += lp[d][r]
        sc.append((node, math.exp(s) if ok else 0.0, tree.source[node]))
    cur["sc"] = sc
treemod.best_first_tree = bft
import specdiff_ext.ops as ops
ov = ops.verify_tree
def vt(*a, **k):
    r = ov(*a, **k)
    cur["acc"] = int(r.num_accepted[0]); rec.append((cur.get("sc", []), cur["acc"])); cur["sc"] = []
    return r
ops.verify_tree = vt
import specdiff_ext.decoding as decm
decm.ops.verify_tree = vt
for p in prompts:
    dec.generate(p, 64, temperature=T, seed=1)
import json
json.dump(rec, open(f"/tmp/tree_score_T{T}.json", "w"))
# analysis: E = sum of scores of all nodes
import collections
b = collections.defaultdict(list)
for sc, acc in rec:
    E = sum(s for _, s, _ in sc)
    b[min(int(E * 4), 12)].append(acc)
for k in sorted(b):
    print("E in [%.2f,%.2f): n=%d mean acc %.2f" % (k / 4, (k + 1) / 4, len(b[k]), sum(b[k]) / len(b[k])))
print("rounds", len(rec), "mean acc", sum(a for _, a in rec) / len(rec))
