"""MoE compression study: a Mixtral-architecture LM's experts compressed by every method at equal
expert-parameter budgets (issue 25, point 3), resumable.

    # the study (3 seeds, every method, 25/50/75% fewer expert parameters)
    python recipes/moe_compression.py
    # a reduced scale: one seed, short base training and recovery, part of the test set
    python recipes/moe_compression.py --seeds 1 --base-epochs 2 --recovery-steps 50 --max-test-blocks 256
    # a pretrained MoE (GPU), calibration from a local text file
    python recipes/moe_compression.py --model PATH --calibration-file calib.txt --test-file test.txt \\
        --device cuda --output-dir results/moe_compression_mixtral

Per seed: a ``MixtralForCausalLM`` built from a config and trained from scratch on WikiText-2
valid (the project's byte-level BPE, trained once and saved), block 128; then each (method,
fraction removed) is applied to a copy of it and scored: WikiText-2 test PPL without retraining,
the relative output error of every MoE block on held-out tokens (the original model's layer
inputs), and PPL after the same recovery fine-tune for every method. Methods:

* tnmoe (``moe.compress``, same calibration batches): ``tt-svd`` (per-expert TT-SVD of an m-core
  MPO, no data: ``fit_options={"start": "tt-svd", "sweeps": 0}``), ``svd`` (per-expert rank-r
  SVD, no data: the same options on the m = 2 unit-factor form), ``whitened-svd`` (per-expert,
  fitted to the routed inputs), ``shared-v`` (m = 2, ``share=[1]``: one hidden-side basis per
  layer and matrix, MoE-SVD-style), ``mpoe`` (m-core MPO, central core shared, fitted to data),
  ``base-delta`` (one base matrix per layer and role shared by all experts plus a low-rank delta
  per expert, D²-MoE-style, fitted to data: ``MoEConfig(expert_type="base_delta")``);
* baselines (here, not library code): ``merge`` (E' survivors = the most routed experts; every
  other expert joins the survivor whose outputs on the calibration tokens are most similar;
  each group's weights averaged by routing frequency; the router keeps its E rows, a merged
  expert's index runs its survivor) and ``prune`` (the E' most routed experts kept, the router's
  rows of the others dropped; top-k unchanged). Removing a fraction f of E experts keeps
  E' = E (1 - f): both need f E to be an integer.

Every run is one JSON file ``<output-dir>/runs/<method>-r<percent removed>-s<seed>.json``
(``uncompressed-s<seed>.json`` for the reference); a rerun reuses the finished ones (made with
the same settings, else it stops and says what differs). Base models and the tokenizer go to
``<output-dir>/base/`` (not committed; rebuilt when missing). Writes ``summary.json`` and
``pareto.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mpoe_gpt2 import blocks_of, perplexity, read_lines, train_bpe  # noqa: E402
from run_io import RecipeError, Timer, path_fingerprint, run_main, set_seed  # noqa: E402
from studies import RunClaim, StudyError, mean_std  # noqa: E402

import tnmoe.moe as moe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"

#: tnmoe methods: ``moe.compress`` options. ``low_rank``: the m = 2 unit-factor (rank-r) form;
#: otherwise an MPO of ``--m`` cores. ``fit_options`` None: compress's data-aware fit.
TNMOE_METHODS: dict[str, dict] = {
    "tt-svd": {"share": "none", "low_rank": False, "fit_options": {"start": "tt-svd", "sweeps": 0}},
    "svd": {"share": "none", "low_rank": True, "fit_options": {"start": "tt-svd", "sweeps": 0}},
    "whitened-svd": {"share": "none", "low_rank": True, "fit_options": None},
    "shared-v": {"share": [1], "low_rank": True, "fit_options": None},
    "mpoe": {"share": "central", "low_rank": False, "fit_options": None},
    "base-delta": {"expert_type": "base_delta", "fit_options": None},
}
BASELINE_METHODS = ("merge", "prune")
METHODS = tuple(TNMOE_METHODS) + BASELINE_METHODS


# -- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default=str(ROOT / "results" / "moe_compression"))
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (one base model each)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--ratios", default="25,50,75", help="comma-separated percentages of expert parameters removed")
    ap.add_argument("--m", type=int, default=5, help="MPO cores of tt-svd and mpoe")
    ap.add_argument("--fit-sweeps", type=int, default=None,
                    help="ALS sweeps of the data-aware tnmoe methods (default: compress's); bounds the fit's time")
    # data
    ap.add_argument("--train-file", default=str(WIKITEXT / "valid.txt"),
                    help="training text of the base model and of the recovery fine-tune (one paragraph a line)")
    ap.add_argument("--test-file", default=str(WIKITEXT / "test.txt"))
    ap.add_argument("--calibration-file", default=None,
                    help="calibration text (default: the first --calibration-blocks blocks of --train-file)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary trained on --train-file")
    ap.add_argument("--calibration-blocks", type=int, default=64)
    ap.add_argument("--error-blocks", type=int, default=16,
                    help="held-out blocks (the first of the test text) for the per-layer output error")
    ap.add_argument("--max-test-blocks", type=int, default=None, help="score PPL on the first N test blocks")
    ap.add_argument("--batch-size", type=int, default=16)
    # the base model (from scratch)
    ap.add_argument("--model", default=None, help="a pretrained MoE (path or name) instead of training one")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512, help="per expert")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--base-epochs", type=float, default=4.0)
    ap.add_argument("--base-lr", type=float, default=1e-3)
    # recovery
    ap.add_argument("--recovery-steps", type=int, default=100, help="AdamW steps after compression (0: none)")
    ap.add_argument("--recovery-lr", type=float, default=1e-4)
    ap.add_argument("--recovery-batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights of a pretrained --model (the from-scratch models are float32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--summary-only", action="store_true", help="run nothing: summarize the finished runs")
    ap.add_argument("--quiet", action="store_true")
    return ap


def _csv(text: str, kind: Callable = str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.seeds = _csv(args.seeds, int)
    args.methods = _csv(args.methods)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise RecipeError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.ratios = _csv(args.ratios, int)
    if any(not 0 < r < 100 for r in args.ratios):
        raise RecipeError(f"--ratios are percentages of expert parameters removed, in (0, 100); got {args.ratios}")
    return args


# -- data -----------------------------------------------------------------------------------------------
def load_tokenizer(args, train_lines: list[str], base_dir: Path):
    """The pretrained model's tokenizer (``--model``), else the BPE trained once on the training
    text and saved under ``base_dir/tokenizer`` (reloaded when it was trained on the same text)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        path = base_dir / "tokenizer"
        made_from = {"train_file": path_fingerprint(args.train_file), "vocab_size": args.vocab_size}
        record = path / "made_from.json"
        if record.is_file() and json.loads(record.read_text()) == made_from:
            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tok = train_bpe(train_lines, args.vocab_size)
            tok.save_pretrained(path)
            record.write_text(json.dumps(made_from))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def calibration_batches(blocks: torch.Tensor, batch_size: int) -> list[dict]:
    """``{"input_ids": (b, block)}`` batches of ``blocks`` ``(n, block)``, in order."""
    return [{"input_ids": blocks[i:i + batch_size]} for i in range(0, len(blocks), batch_size)]


# -- the base model -----------------------------------------------------------------------------------
def mixtral_config(args, vocab_size: int, tok):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=max(args.block_size, 128), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        output_router_logits=True)  # the load-balancing loss while the base model trains


def train_base(args, seed: int, train_blocks: torch.Tensor, tok) -> tuple[nn.Module, dict]:
    """A MixtralForCausalLM from a config, trained from scratch: AdamW, cosine schedule with 5%
    warm-up, the model's loss (LM + its load-balancing loss), gradient norm clipped at 1."""
    from transformers import MixtralForCausalLM, get_cosine_schedule_with_warmup

    set_seed(seed)
    model = MixtralForCausalLM(mixtral_config(args, len(tok), tok)).to(args.device)
    steps = max(1, int(args.base_epochs * math.ceil(len(train_blocks) / args.batch_size)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.base_lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, int(0.05 * steps), steps)
    order = _batch_order(len(train_blocks), args.batch_size, steps, torch.Generator().manual_seed(seed))
    model.train()
    losses = []
    with Timer() as timer:
        for idx in tqdm(order, desc=f"training base model (seed {seed})", disable=args.quiet):
            x = train_blocks[idx].to(args.device)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    model.eval()
    model.config.output_router_logits = False
    last = losses[-10:]
    return model, {"train_steps": steps, "train_seconds": timer.seconds, "final_train_loss": sum(last) / len(last)}


def _batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` index batches: epochs of a random permutation of ``range(n)``, the last batch of
    an epoch possibly smaller."""
    order: list[torch.Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(n, generator=generator)
        order += list(perm.split(batch_size))
    return order[:steps]


def base_model(args, seed: int, settings: dict, train_blocks, tok, base_dir: Path) -> tuple[nn.Module, dict]:
    """The seed's base model: the pretrained ``--model``, the one saved under ``base_dir/seed<N>``
    when it was made with these settings, else a newly trained one (saved there)."""
    from transformers import AutoModelForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        return model.to(args.device).eval(), {}
    where = base_dir / f"seed{seed}"
    record = where / "base.json"
    if record.is_file():
        stored = json.loads(record.read_text())
        if stored["settings"] == settings["base"]:
            model = AutoModelForCausalLM.from_pretrained(where / "model").to(args.device).eval()
            return model, stored["training"]
        print(f"{where}: made with other settings, training a new base model", flush=True)
    model, training = train_base(args, seed, train_blocks, tok)
    model.save_pretrained(where / "model")
    record.write_text(json.dumps({"settings": settings["base"], "training": training}, indent=2))
    return model, training


# -- the experts of a model --------------------------------------------------------------------------------
def experts_names(model: nn.Module) -> list[str]:
    """Names of the model's routed experts modules (``model.layers.<i>.mlp.experts``, ...)."""
    names = [n for n, m in moe.find_target_modules(model) if type(m).__name__.endswith("Experts")]
    if not names:
        raise RecipeError(f"{type(model).__name__} has no routed experts modules: this study compresses MoE models")
    return names


def expert_parameters(model: nn.Module, names: Sequence[str]) -> int:
    """Parameters of the experts modules at ``names`` (each tensor once, as ``moe.count_parameters``
    counts: a shared core once per layer). Routers are not expert parameters."""
    params = {id(p): p for n in names for p in model.get_submodule(n).parameters()}
    return sum(p.numel() for p in params.values())


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent), child


# -- per-layer output error --------------------------------------------------------------------------------
@torch.no_grad()
def capture_blocks(model: nn.Module, names: Sequence[str], batches: Sequence[dict]) -> dict[str, list]:
    """``{block name: [(input, output), ...]}`` of every MoE block (the experts' parent: router +
    experts) on ``batches``, on the CPU."""
    blocks = [n.rpartition(".")[0] for n in names]
    seen: dict[str, list] = {b: [] for b in blocks}
    hooks = [model.get_submodule(b).register_forward_hook(
        lambda mod, args, out, b=b: seen[b].append((args[0].detach().cpu(), _first(out).detach().cpu())))
        for b in blocks]
    _run_hooked(model, batches, hooks)
    return seen


def _run_hooked(model: nn.Module, batches: Sequence[dict], hooks: list) -> None:
    """Run ``batches`` through ``model`` in eval mode (no KV cache), then remove ``hooks``, also on error."""
    try:
        model.eval()
        for batch in batches:
            model(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def block_output_errors(model: nn.Module, reference: dict[str, list]) -> list[float]:
    """Per MoE block: ``||y_compressed - y_original|| / ||y_original||`` over every held-out token,
    ``y_compressed`` = the block of ``model`` on the original model's inputs to that block."""
    model.eval()
    errors = []
    for block, pairs in reference.items():
        module = model.get_submodule(block)
        diff = norm = 0.0
        for x, y in pairs:
            got = _first(module(x.to(model.device))).double().cpu()
            diff += float(((got - y.double()) ** 2).sum())
            norm += float((y.double() ** 2).sum())
        errors.append(math.sqrt(diff / norm))
    return errors


# -- baselines: merging and pruning -----------------------------------------------------------------------
class RemappedExperts(nn.Module):
    """``E'`` experts behind a router of ``E`` outputs: router index ``e`` runs expert
    ``expert_map[e]`` (two picks of one survivor add their routing weights)."""

    def __init__(self, experts: nn.Module, expert_map: torch.Tensor) -> None:
        super().__init__()
        self.experts = experts
        self.register_buffer("expert_map", expert_map.long())

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args, **kwargs) -> torch.Tensor:
        return self.experts(hidden_states, self.expert_map[top_k_index], top_k_weights, *args, **kwargs)


def _expert_tensors(experts: nn.Module) -> dict[str, nn.Parameter]:
    """The experts module's per-expert tensors (leading dimension E = ``num_experts``)."""
    E = getattr(experts, "num_experts", None)
    params = dict(experts.named_parameters(recurse=False))
    if E is None or not params or any(p.shape[0] != E for p in params.values()) \
            or any(True for c in experts.children() for _ in c.parameters()):
        raise RecipeError(f"{type(experts).__name__}: merging and pruning need a fused experts module (every "
                          "parameter (num_experts, ...), e.g. transformers' MixtralExperts)")
    return params


def _rebuilt_experts(experts: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``experts`` holding ``tensors`` ``(E', ...)`` instead of its own."""
    new = copy.copy(experts)
    new._parameters = {k: nn.Parameter(v.detach().clone(), requires_grad=experts._parameters[k].requires_grad)
                       for k, v in tensors.items()}
    new.num_experts = next(iter(tensors.values())).shape[0]
    return new


@torch.no_grad()
def routing_statistics(model: nn.Module, names: Sequence[str], batches: Sequence[dict],
                       sample_tokens: int = 1024) -> dict[str, dict]:
    """Per experts module, on the calibration batches: ``counts`` ``(E,)`` (top-k picks of each
    expert) and ``inputs`` ``(<= sample_tokens, d)`` (the first tokens the experts module saw)."""
    stats = {n: {"counts": None, "inputs": []} for n in names}

    def hook(name):
        def record(module, args, kwargs):
            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights")[len(args):]]
            x, index = values[0], values[1]
            s = stats[name]
            counts = torch.bincount(index.reshape(-1).long().cpu(), minlength=module.num_experts)[:module.num_experts]
            s["counts"] = counts if s["counts"] is None else s["counts"] + counts
            have = sum(len(t) for t in s["inputs"])
            if have < sample_tokens:
                s["inputs"].append(x[: sample_tokens - have].detach().cpu())
        return record

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    _run_hooked(model, batches, hooks)
    return {n: {"counts": s["counts"], "inputs": torch.cat(s["inputs"])} for n, s in stats.items()}


def _keep(counts: torch.Tensor, kept: int) -> list[int]:
    """The ``kept`` most routed experts (ties: the lower index), in index order."""
    order = sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))
    return sorted(order[:kept])


@torch.no_grad()
def expert_outputs(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(E, T, d)``: each expert alone (weight 1) on the tokens ``x`` ``(T, d)``."""
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    return torch.stack([experts(x, torch.full((x.shape[0], 1), e, device=x.device), ones)
                        for e in range(experts.num_experts)])


def merge_groups(counts: torch.Tensor, outputs: torch.Tensor, kept: int) -> list[int]:
    """``expert_map`` ``(E,)``: survivors (the ``kept`` most routed) map to their own group
    (numbered in index order), every other expert to the survivor whose outputs ``(E, T, d)`` have
    the highest cosine similarity with its own."""
    survivors = _keep(counts, kept)
    flat = torch.nn.functional.normalize(outputs.reshape(outputs.shape[0], -1).double(), dim=1)
    sim = flat @ flat.T
    expert_map = []
    for e in range(len(counts)):
        if e in survivors:
            expert_map.append(survivors.index(e))
        else:
            expert_map.append(max(range(kept), key=lambda g: (float(sim[e, survivors[g]]), -g)))
    return expert_map


def merge_experts(model: nn.Module, names: Sequence[str], kept: int, stats: dict[str, dict]) -> dict:
    """Frequency-weighted merging to ``kept`` experts per layer, in place (see the module doc)."""
    groups = {}
    for name in names:
        experts = model.get_submodule(name)
        tensors = _expert_tensors(experts)
        counts = stats[name]["counts"]
        x = stats[name]["inputs"].to(next(iter(tensors.values())).device, next(iter(tensors.values())).dtype)
        expert_map = merge_groups(counts, expert_outputs(experts, x), kept)
        merged = {}
        for key, W in tensors.items():
            rows = []
            for g in range(kept):
                members = [e for e in range(len(expert_map)) if expert_map[e] == g]
                w = torch.tensor([float(counts[e]) for e in members], dtype=torch.float64)
                w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(members))
                rows.append(sum(float(wi) * W[e].detach().double() for wi, e in zip(w, members)).to(W.dtype))
            merged[key] = torch.stack(rows)
        parent, child = _parent(model, name)
        setattr(parent, child, RemappedExperts(_rebuilt_experts(experts, merged),
                                               torch.tensor(expert_map, device=W.device)))
        groups[name] = expert_map
    return {"expert_map": groups}


def _router_of(model: nn.Module, name: str, num_experts: int) -> nn.Module:
    block = model.get_submodule(name.rpartition(".")[0])
    for attr in ("gate", "router"):
        router = getattr(block, attr, None)
        weight = getattr(router, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts:
            return router
    raise RecipeError(f"{name}: found no router (.gate or .router with a ({num_experts}, d) weight) in its "
                      "block; pruning drops router rows and needs it")


def prune_experts(model: nn.Module, names: Sequence[str], kept: int, stats: dict[str, dict]) -> dict:
    """Keep the ``kept`` most routed experts per layer and their router rows, in place."""
    kept_by_layer = {}
    for name in names:
        experts = model.get_submodule(name)
        tensors = _expert_tensors(experts)
        keep = _keep(stats[name]["counts"], kept)
        router = _router_of(model, name, experts.num_experts)
        for key, p in list(router.named_parameters(recurse=False)):
            if p.shape[0] != experts.num_experts:
                raise RecipeError(f"{name}: router parameter {key} {tuple(p.shape)} is not one row per expert")
            router._parameters[key] = nn.Parameter(p.detach()[keep].clone(), requires_grad=p.requires_grad)
        if hasattr(router, "num_experts"):
            router.num_experts = kept
        parent, child = _parent(model, name)
        setattr(parent, child, _rebuilt_experts(experts, {k: W.detach()[keep] for k, W in tensors.items()}))
        kept_by_layer[name] = keep
    return {"kept_experts": kept_by_layer}


# -- applying a method ----------------------------------------------------------------------------------
def ffn_sizes(model: nn.Module) -> tuple[int, int]:
    """``(d_model, d_ff)`` of the routed experts."""
    dims = moe.ffn_dimensions(model)
    d_model = int(model.config.hidden_size)
    others = [d for d in dims if d != d_model]
    if len(others) != 1:
        raise RecipeError(f"expected the experts' matrices to be d_model x d_ff, got dimensions {dims}")
    return d_model, others[0]


def apply_method(model: nn.Module, method: str, removed: float, names: Sequence[str],
                 calibration: Sequence[dict], args) -> dict:
    """Compress ``model``'s experts in place by ``method`` to remove the fraction ``removed`` of
    the expert parameters (at most: never above the budget); returns what was done."""
    if method in TNMOE_METHODS:
        spec = TNMOE_METHODS[method]
        d_model, d_ff = ffn_sizes(model)
        if spec.get("expert_type") == "base_delta":
            config = moe.MoEConfig(expert_type="base_delta")
        elif spec["low_rank"]:
            try:
                factors = moe.low_rank_factors(d_model, d_ff)
            except ValueError as err:
                raise RecipeError(f"{method}: {err}") from None
            config = moe.MoEConfig(share=spec["share"], factors=factors)
        else:
            config = moe.MoEConfig(share=spec["share"], m=args.m)
        fit_options = spec["fit_options"]
        if fit_options is None and getattr(args, "fit_sweeps", None) is not None:
            fit_options = {"sweeps": args.fit_sweeps}
        report = moe.compress(model, config, calibration=calibration, target_ratio=1.0 - removed,
                              fit_options=fit_options, progress=not args.quiet)
        errors = [sum(v) / len(v) for r in report.layers for v in r.output_error.values()]
        return {"max_bond": report.config.max_bond, "share": report.config.share, "m": report.config.m,
                "compress_params_before": report.params_before, "compress_params_after": report.params_after,
                "calibration_output_error_mean": sum(errors) / len(errors),
                "fallback_experts": report.fallbacks}
    experts = model.get_submodule(names[0])
    E = experts.num_experts
    kept = E * (1.0 - removed)
    if abs(kept - round(kept)) > 1e-9 or round(kept) < 1:
        raise RecipeError(f"{method}: removing {removed:.0%} of {E} experts leaves {kept:g}; merging and pruning "
                          "keep whole experts, so choose ratios that are multiples of 1/E")
    stats = routing_statistics(model, names, calibration)
    do = merge_experts if method == "merge" else prune_experts
    info = do(model, names, int(round(kept)), stats)
    info["routing_counts"] = {n: s["counts"].tolist() for n, s in stats.items()}
    return info


# -- recovery fine-tune -----------------------------------------------------------------------------------
def recover(model: nn.Module, train_blocks: torch.Tensor, args, seed: int) -> float:
    """``--recovery-steps`` AdamW steps (constant ``--recovery-lr``, no weight decay, gradient norm
    clipped at 1) on LM loss only, every parameter trainable; the batches depend on the seed only,
    so every method of a seed sees the same ones. Returns the wall seconds."""
    if args.recovery_steps <= 0:
        return 0.0
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.recovery_lr, weight_decay=0.0)
    order = _batch_order(len(train_blocks), args.recovery_batch_size, args.recovery_steps,
                         torch.Generator().manual_seed(10_000 + seed))
    model.train()
    with Timer() as timer:
        for idx in tqdm(order, desc="recovery fine-tune", disable=args.quiet, leave=False):
            x = train_blocks[idx].to(model.device)
            loss = model(input_ids=x, labels=x, output_router_logits=False, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    model.eval()
    return timer.seconds


# -- runs and their records ----------------------------------------------------------------------------------
def run_name(method: str, removed_percent: int, seed: int) -> str:
    return f"{method}-r{removed_percent}-s{seed}"


def study_settings(args, tok_vocab: int) -> dict:
    """What every run of this study shares; a finished run is reused only under the same."""
    data = {"train_file": path_fingerprint(args.train_file), "test_file": path_fingerprint(args.test_file),
            "calibration_file": path_fingerprint(args.calibration_file) if args.calibration_file else None}
    base = ({"model": args.model, "dtype": args.dtype} if args.model else {
        "architecture": "MixtralForCausalLM", "layers": args.layers, "hidden": args.hidden,
        "intermediate": args.intermediate, "experts": args.experts, "top_k": args.top_k, "heads": args.heads,
        "kv_heads": args.kv_heads, "vocab_size": tok_vocab, "block_size": args.block_size,
        "epochs": args.base_epochs, "lr": args.base_lr, "batch_size": args.batch_size,
        "train_file": data["train_file"]})
    return {"base": base, "data": data, "block_size": args.block_size, "m": args.m, "fit_sweeps": args.fit_sweeps,
            "calibration_blocks": args.calibration_blocks, "error_blocks": args.error_blocks,
            "max_test_blocks": args.max_test_blocks, "recovery_steps": args.recovery_steps,
            "recovery_lr": args.recovery_lr, "recovery_batch_size": args.recovery_batch_size}


def read_run(path: Path, settings: dict) -> dict | None:
    """The finished run at ``path`` (``None`` if there is none); an error if it was made with
    other settings."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("settings") != settings:
        stored = record.get("settings") or {}
        diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise StudyError(f"{path} was made with other settings ({', '.join(diff)} differ); delete it to rerun it, "
                         "or give this study another --output-dir")
    return record


def write_run(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically (a crash leaves no half-written run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or reuse) every (seed, method, ratio) of the study; returns the summary."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    runs_dir, base_dir = out / "runs", out / "base"
    if args.summary_only:
        return write_summary(out, args)
    train_lines = read_lines(args.train_file)
    test_lines = read_lines(args.test_file)
    tok = load_tokenizer(args, train_lines, base_dir)
    settings = study_settings(args, len(tok))
    train_blocks = blocks_of(tok, train_lines, args.block_size, None)
    test_blocks = blocks_of(tok, test_lines, args.block_size, args.max_test_blocks)
    calib_source = blocks_of(tok, read_lines(args.calibration_file), args.block_size, args.calibration_blocks) \
        if args.calibration_file else train_blocks[: args.calibration_blocks]
    calibration = calibration_batches(calib_source, 8)
    error_batches = calibration_batches(blocks_of(tok, test_lines, args.block_size, args.error_blocks), 8)
    eval_batch = max(args.batch_size, 16)

    for seed in args.seeds:
        todo = [(m, r) for m in args.methods for r in args.ratios
                if read_run(runs_dir / f"{run_name(m, r, seed)}.json", settings) is None]
        ref_path = runs_dir / f"uncompressed-s{seed}.json"
        if not todo and read_run(ref_path, settings) is not None:
            continue
        base, training = base_model(args, seed, settings, train_blocks, tok, base_dir)
        names = experts_names(base)
        reference = capture_blocks(base, names, error_batches)
        before = expert_parameters(base, names)
        if args.model:  # a pretrained model is reloaded for each run instead of kept twice in memory
            del base

            def fresh() -> nn.Module:
                return base_model(args, seed, settings, train_blocks, tok, base_dir)[0]
        else:
            def fresh() -> nn.Module:
                return copy.deepcopy(base)
        if read_run(ref_path, settings) is None:
            model = fresh()
            ppl = perplexity(model, test_blocks, eval_batch, args.quiet)[0]
            seconds = recover(model, train_blocks, args, seed)
            write_run(ref_path, {"seed": seed, "method": "uncompressed", "expert_params": before, "ppl": ppl,
                                 "ppl_recovered": perplexity(model, test_blocks, eval_batch, args.quiet)[0],
                                 "recovery_seconds": seconds, "base_training": training,
                                 "test_tokens": int(test_blocks.numel()), "settings": settings})
            print(f"seed {seed}: uncompressed test PPL {ppl:.2f}", flush=True)
            del model
        for method, removed_percent in todo:
            name = run_name(method, removed_percent, seed)
            claim = RunClaim(runs_dir, name)
            if not claim.acquire():
                print(f"{name}: running in another process, skipped", flush=True)
                continue
            try:
                if read_run(runs_dir / f"{name}.json", settings) is not None:
                    continue
                run_one(fresh(), names, before, reference, method, removed_percent, seed, calibration, test_blocks,
                        train_blocks, eval_batch, settings, runs_dir / f"{name}.json", args)
            finally:
                claim.release()
    return write_summary(out, args)


def run_one(model, names, before, reference, method, removed_percent, seed, calibration, test_blocks,
            train_blocks, eval_batch, settings, path: Path, args) -> dict:
    """Apply one method to ``model`` (a fresh copy of the base model), score it, recover it, score
    it again; writes ``path``."""
    record = {"seed": seed, "method": method, "family": "tnmoe" if method in TNMOE_METHODS else "baseline",
              "removed_percent": removed_percent, "expert_params_before": before}
    t0 = time.perf_counter()
    try:
        info = apply_method(model, method, removed_percent / 100.0, names, calibration, args)
    except ValueError as err:
        if "below what bond 1 reaches" not in str(err):
            raise
        # the structure's smallest instance exceeds the budget: recorded, listed under the table
        record.update(error=str(err), settings=settings)
        write_run(path, record)
        print(f"{path.stem}: not expressible: {err}", flush=True)
        return record
    after = expert_parameters(model, names)
    if after > before * (1 - removed_percent / 100.0):
        raise RuntimeError(f"{path.stem}: {after} expert parameters exceed the budget "
                           f"{before * (1 - removed_percent / 100.0):.0f}")
    reported = (info.get("compress_params_after"), info.get("compress_params_before"))
    if "compress_params_after" in info and reported != (after, before):
        raise RuntimeError(f"{path.stem}: compress reports {info['compress_params_after']} / "
                           f"{info['compress_params_before']} expert parameters, counted here {after} / {before}")
    record.update(compress_seconds=time.perf_counter() - t0, expert_params=after, expert_param_ratio=after / before,
                  **info)
    record["ppl"] = perplexity(model, test_blocks, eval_batch, args.quiet)[0]
    record["output_error"] = block_output_errors(model, reference)
    record["output_error_mean"] = sum(record["output_error"]) / len(record["output_error"])
    record["recovery_seconds"] = recover(model, train_blocks, args, seed)
    record["ppl_recovered"] = perplexity(model, test_blocks, eval_batch, args.quiet)[0]
    record["settings"] = settings
    write_run(path, record)
    print(f"{path.stem}: expert params {record['expert_param_ratio']:.3f}, PPL {record['ppl']:.2f}, recovered "
          f"{record['ppl_recovered']:.2f}, output error {record['output_error_mean']:.4f}", flush=True)
    return record


# -- summary -----------------------------------------------------------------------------------------------
def summarize(records: Sequence[dict]) -> dict:
    """``{"uncompressed_ppl_mean", "uncompressed_ppl_recovered_mean", "rows", "not_expressible"}``
    from run records; one row per (method, percent removed) with every seed's run, in the order
    first seen. Runs of one row must share their settings (they do: read_run checks them)."""
    ref = [r for r in records if r["method"] == "uncompressed"]
    groups: dict[tuple, list[dict]] = {}
    failed = []
    for r in records:
        if r["method"] == "uncompressed":
            continue
        if "error" in r:
            failed.append({"method": r["method"], "removed_percent": r["removed_percent"], "seed": r["seed"],
                           "error": r["error"]})
            continue
        groups.setdefault((r["method"], r["removed_percent"]), []).append(r)
    rows = []
    for (method, removed), rs in groups.items():
        ppl_mean, ppl_std = mean_std([r["ppl"] for r in rs])
        rec_mean, rec_std = mean_std([r["ppl_recovered"] for r in rs])
        rows.append({"method": method, "family": rs[0]["family"], "removed_percent": removed,
                     "expert_param_ratio": sum(r["expert_param_ratio"] for r in rs) / len(rs),
                     "seeds": sorted(r["seed"] for r in rs), "ppl_mean": ppl_mean, "ppl_std": ppl_std,
                     "ppl_recovered_mean": rec_mean, "ppl_recovered_std": rec_std,
                     "output_error_mean": sum(r["output_error_mean"] for r in rs) / len(rs),
                     "max_bond": rs[0].get("max_bond")})
    return {"uncompressed_ppl_mean": mean_std([r["ppl"] for r in ref])[0] if ref else None,
            "uncompressed_ppl_std": mean_std([r["ppl"] for r in ref])[1] if ref else None,
            "uncompressed_ppl_recovered_mean": mean_std([r["ppl_recovered"] for r in ref])[0] if ref else None,
            "uncompressed_seeds": sorted(r["seed"] for r in ref), "rows": rows, "not_expressible": failed}


def write_summary(out: Path, args) -> dict:
    """``summary.json`` and ``pareto.png`` from the finished runs of the seeds / methods / ratios asked for."""
    records = []
    for path in sorted((out / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if r["seed"] not in args.seeds:
            continue
        if r["method"] == "uncompressed" or (r["method"] in args.methods and r["removed_percent"] in args.ratios):
            records.append(r)
    if not records:
        raise RecipeError(f"no finished run under {out / 'runs'} for these seeds / methods / ratios")
    settings = {json.dumps(r["settings"], sort_keys=True) for r in records}
    if len(settings) > 1:
        raise StudyError(f"the runs under {out / 'runs'} were made with different settings; delete the odd ones out")
    order = {m: i for i, m in enumerate(METHODS)}
    records.sort(key=lambda r: (order.get(r["method"], -1), r.get("removed_percent", 0), r["seed"]))
    summary = summarize(records)
    summary["settings"] = json.loads(next(iter(settings)))
    write_run(out / "summary.json", summary)
    pareto_plot(summary, out / "pareto.png")
    if not args.quiet:
        for row in summary["rows"]:
            print({k: row[k] for k in ("method", "expert_param_ratio", "ppl_mean", "ppl_recovered_mean",
                                       "output_error_mean")})
    return summary


def pareto_plot(summary: dict, path: Path) -> None:
    """Test PPL against the expert-parameter ratio kept, one line per method; left: without
    retraining, right: after the recovery fine-tune; dashed: the uncompressed model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, key, ref_key, title in ((axes[0], "ppl_mean", "uncompressed_ppl_mean", "without retraining"),
                                    (axes[1], "ppl_recovered_mean", "uncompressed_ppl_recovered_mean",
                                     "after the recovery fine-tune")):
        for method in dict.fromkeys(r["method"] for r in summary["rows"]):
            rows = sorted((r for r in summary["rows"] if r["method"] == method), key=lambda r: r["expert_param_ratio"])
            style = "-o" if rows[0]["family"] == "tnmoe" else "--s"
            ax.plot([r["expert_param_ratio"] for r in rows], [r[key] for r in rows], style, label=method)
        if summary.get(ref_key):
            ax.axhline(summary[ref_key], color="gray", ls=":", label="uncompressed")
        ax.set_xlabel("expert parameters kept (fraction)")
        ax.set_ylabel("WikiText-2 test PPL (lower is better)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
