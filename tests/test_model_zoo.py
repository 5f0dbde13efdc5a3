"""Every supported architecture, the same checks: tiny random configs with every parameter
perturbed (no trivially exact conversion), converted losslessly, compared with the original.

``CASES`` is the list ``results/make_tables.py architectures`` prints as the table of
``docs/architectures.md``: one case per (architecture, way in, expert bank). Ways in: ``upcycle``
(a dense FFN becomes lossless MPOE experts with a tnmoe router) and ``convert`` (an MoE model's
routed experts become a tnmoe bank; the model's router, shared experts and auxiliary loss kept).
``CHECKS`` names the checks; ``NOT_APPLICABLE`` the (case, check) pairs that do not exist.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")
from torch.utils.data import Dataset, SequentialSampler  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import tnmoe.moe as moe  # noqa: E402
from tnmoe.moe import MoEConfig  # noqa: E402

VOCAB = 100
ATTN = dict(num_attention_heads=4, max_position_embeddings=64)
LM = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def _causal(config_cls, model_cls, **kw):
    return lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))


# -- dense architectures (upcycled) ----------------------------------------------------------------
def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=2, eos_token_id=1,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=VOCAB, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


DENSE_LM = dict(LM, intermediate_size=64, num_key_value_heads=2, **ATTN)
_llama = _causal("LlamaConfig", "LlamaForCausalLM", **DENSE_LM)
_qwen3 = _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **DENSE_LM)
_gemma2 = _causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, hidden_activation="gelu_pytorch_tanh",
                  sliding_window=8, **DENSE_LM)
_gemma3 = _causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, hidden_activation="gelu_pytorch_tanh",
                  sliding_window=8, **DENSE_LM)
_phi3 = _causal("Phi3Config", "Phi3ForCausalLM", **DENSE_LM)
_olmo2 = _causal("Olmo2Config", "Olmo2ForCausalLM", **DENSE_LM)
_neox = _causal("GPTNeoXConfig", "GPTNeoXForCausalLM", **dict(DENSE_LM, num_key_value_heads=None,
                                                              hidden_dropout=0.0, attention_dropout=0.0))

# -- MoE architectures (experts converted) ------------------------------------------------------------
MOE_LM = dict(LM, num_key_value_heads=2, output_router_logits=True, router_aux_loss_coef=0.5, **ATTN)
_mixtral = _causal("MixtralConfig", "MixtralForCausalLM", intermediate_size=32, num_local_experts=4,
                   num_experts_per_tok=2, **MOE_LM)
_qwen2_moe = _causal("Qwen2MoeConfig", "Qwen2MoeForCausalLM", intermediate_size=64, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                     **MOE_LM)
_qwen3_moe = _causal("Qwen3MoeConfig", "Qwen3MoeForCausalLM", intermediate_size=64, moe_intermediate_size=32,
                     num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, **MOE_LM)
_olmoe = _causal("OlmoeConfig", "OlmoeForCausalLM", intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                 **MOE_LM)
_deepseek_v3 = _causal("DeepseekV3Config", "DeepseekV3ForCausalLM", **dict(
    LM, num_key_value_heads=4, **ATTN, intermediate_size=64, moe_intermediate_size=32, n_shared_experts=1,
    n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
    q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
    norm_topk_prob=True))
_gpt_oss = _causal("GptOssConfig", "GptOssForCausalLM", intermediate_size=32, num_local_experts=4,
                   num_experts_per_tok=2, head_dim=8, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"], **MOE_LM)


def _switch():
    return transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
        # every 2nd layer sparse: transformers computes Switch's router loss only when some layers are dense
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4, num_experts=4, expert_capacity=64,
        dropout_rate=0.0, router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        router_aux_loss_coef=0.5, router_z_loss_coef=0.01))


@dataclass(frozen=True)
class Case:
    """One architecture converted one way. ``way``: ``upcycle`` / ``convert``; ``bank``: the
    experts' bank (``mpo`` lossless, ``dense`` a copy); ``task``: ``causal``, ``seq2seq``, ``seqcls``."""

    arch: str
    way: str
    bank: str
    task: str
    build: Callable

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.way}-{self.bank}"

    def config(self, **kw) -> MoEConfig:
        if self.way == "upcycle":  # lossless MPOE: 4 experts sharing the central core
            return MoEConfig(num_experts=4, m=3, share="central", **kw)
        if self.bank == "dense":
            return MoEConfig(expert_type="dense", **kw)
        return MoEConfig(expert_type="mpo", share="none", m=2, **kw)


UPCYCLE = [("GPT-2", "causal", _gpt2), ("T5 v1.1", "seq2seq", _t5), ("BERT", "seqcls", _bert),
           ("LLaMA", "causal", _llama), ("Qwen3", "causal", _qwen3), ("Gemma 2", "causal", _gemma2),
           ("Gemma 3", "causal", _gemma3), ("Phi-3", "causal", _phi3), ("OLMo 2", "causal", _olmo2),
           ("GPT-NeoX", "causal", _neox)]
CONVERT = [("Mixtral", "causal", _mixtral), ("Qwen2-MoE", "causal", _qwen2_moe), ("Qwen3-MoE", "causal", _qwen3_moe),
           ("OLMoE", "causal", _olmoe), ("DeepSeek-V3", "causal", _deepseek_v3), ("gpt-oss", "causal", _gpt_oss),
           ("Switch Transformers", "seq2seq", _switch)]
CASES = [Case(a, "upcycle", "mpo", t, b) for a, t, b in UPCYCLE] + \
        [Case(a, "convert", bank, t, b) for a, t, b in CONVERT for bank in ("dense", "mpo")]
#: check name -> what it verifies (the table's columns)
CHECKS = {
    "logits": "lossless conversion: the original's logits in eval mode (<= 1e-4, float32)",
    "generate": "greedy generate() with the KV cache: the same tokens, also for a left-padded batch",
    "save/load": "save_pretrained -> AutoModel*.from_pretrained and moe.from_pretrained: the same logits",
    "trainer": "MoETrainer step under gradient accumulation = the step of the summed losses (model's and "
               "tnmoe's auxiliary losses counted once)",
    "gradient mask": "masked steps leave the shared cores unchanged, the experts' own cores train",
    "bf16 autocast": "runs under bf16 autocast, close to the original under the same autocast",
}
#: (case id, check) -> why the check does not apply
NOT_APPLICABLE = {**{(c.id, "generate"): "encoder classifier" for c in CASES if c.task == "seqcls"},
                  **{(c.id, "gradient mask"): "dense bank: no shared cores" for c in CASES if c.bank == "dense"}}

#: checks run on the dense-bank conversion of MoE models only in the slow suite (its logits always):
#: the dense bank is a copy, the lossless MPO bank the harder case of the same code
SLOW_FOR_DENSE_BANK = ("generate", "save/load", "trainer", "bf16 autocast")


def _cases(check: str) -> list:
    return [pytest.param(c, id=c.id, marks=pytest.mark.slow if c.way == "convert" and c.bank == "dense"
                         and check in SLOW_FOR_DENSE_BANK else ()) for c in CASES]


def _applies(case: Case, check: str) -> None:
    why = NOT_APPLICABLE.get((case.id, check))
    if why:
        pytest.skip(f"{check} does not apply: {why}")


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter (and DeepSeek's routing correction bias) moved off its init: norms off 1,
    biases off 0, so nothing is trivially exact."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                     if n.endswith("e_score_correction_bias")]:
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        p.add_(0.1 * noise * (p.float().std() if p.numel() > 1 and p.float().std() > 0 else 1.0))
    return model


@functools.cache
def _original(case_id: str):
    case = next(c for c in CASES if c.id == case_id)
    torch.manual_seed(0)
    return _perturb(case.build()).eval()


def _models(case: Case, **config):
    original = _original(case.id)
    converted = moe.convert(copy.deepcopy(original), case.config(**config), progress=False).eval()
    return original, converted


def _batch(case: Case, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if case.task == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (batch, 5), generator=g)}
    return {"input_ids": ids}


def _out(model, batch):
    return model(**batch).logits


# -- the checks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases('logits'))
def test_logits(case):
    _applies(case, "logits")
    original, converted = _models(case)
    batch = _batch(case)
    with torch.no_grad():
        ref, out = _out(original, batch), _out(converted, batch)
    assert moe.converted_modules(converted)
    assert (out - ref).abs().max().item() <= 1e-4


def _greedy(model, **inputs):
    if getattr(model.config, "output_router_logits", False) and model.config.model_type != "switch_transformers":
        # transformers' load-balancing loss fails on a cached decoding step with an attention mask; the
        # router loss is a training quantity, not generation's
        inputs["output_router_logits"] = False
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores, 1)


def _assert_same_tokens(ref, ref_scores, got):
    """Same tokens; where they first differ (a row), the original's top-2 scores must be a tie
    within the logits tolerance (1e-4), or the conversion changed the greedy choice."""
    if torch.equal(ref, got):
        return
    start = ref.shape[1] - ref_scores.shape[1]
    for row in range(ref.shape[0]):
        diff = (ref[row] != got[row]).nonzero()
        if diff.numel():
            step = int(diff[0]) - start
            top2 = ref_scores[row, step].topk(2).values
            assert float(top2[0] - top2[1]) <= 2e-4, f"row {row} differs at step {step}"


@pytest.mark.parametrize("case", _cases('generate'))
def test_generate(case):
    _applies(case, "generate")
    original, converted = _models(case)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    padded_ids, padded_mask = ids.clone(), mask.clone()
    padded_ids[0, :2], padded_mask[0, :2] = 0, 0  # left padding (seq2seq: padded encoder input)
    with torch.no_grad():
        for inputs in ({"input_ids": ids, "attention_mask": mask},
                       {"input_ids": padded_ids, "attention_mask": padded_mask}):
            ref, scores = _greedy(original, **inputs)
            got, _ = _greedy(converted, **inputs)
            _assert_same_tokens(ref, scores, got)


_AUTO = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
         "seqcls": "AutoModelForSequenceClassification"}


@pytest.mark.parametrize("case", _cases('save/load'))
def test_save_load(case, tmp_path):
    _applies(case, "save/load")
    _, converted = _models(case)
    batch = _batch(case)
    converted.save_pretrained(tmp_path / "ckpt")
    auto = getattr(transformers, _AUTO[case.task]).from_pretrained(tmp_path / "ckpt").eval()
    ours = moe.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        want = _out(converted, batch)
        for loaded in (auto, ours):
            assert moe.converted_modules(loaded) == moe.converted_modules(converted)
            # the same weights through the same code: equal up to float32 reordering
            assert (_out(loaded, batch) - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


class _Rows(Dataset):
    """Fixed token rows with labels (causal: the inputs, first ignored so the Trainer's token
    count equals the mean loss's whichever way it counts; seq2seq: targets; seqcls: a class)."""

    def __init__(self, case: Case, n: int = 4, seq: int = 8):
        g = torch.Generator().manual_seed(3)
        self.task = case.task
        self.rows = torch.randint(3, VOCAB, (n, seq), generator=g)
        self.targets = torch.randint(3, VOCAB, (n, 5), generator=g)
        self.classes = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        item = {"input_ids": self.rows[i].clone()}
        if self.task == "causal":
            item["labels"] = self.rows[i].clone()
            item["labels"][0] = -100
        elif self.task == "seq2seq":
            item["labels"] = self.targets[i].clone()
        else:
            item["labels"] = self.classes[i].clone()
        return item


class _InOrderTrainer(moe.MoETrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


@pytest.mark.parametrize("case", _cases('trainer'))
def test_trainer(case, tmp_path):
    """One SGD step over 2 micro-batches equals the step of ``sum_i (loss_i + tnmoe aux_i) / 2``
    (``loss_i``: the model's loss, its own router loss included): every auxiliary loss counted once."""
    _applies(case, "trainer")
    _, converted = _models(case)
    converted.train()
    if case.arch == "Switch Transformers":  # its router loss is added only when asked for in the call
        converted.forward = functools.partial(converted.forward, output_router_logits=True)
    reference = copy.deepcopy(converted)
    data = _Rows(case)
    lr = 0.5
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=lr, optim="sgd", weight_decay=0.0,
                             max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], disable_tqdm=True,
                             use_cpu=True, save_strategy="no", dataloader_num_workers=0, seed=0)
    _InOrderTrainer(model=converted, args=args, train_dataset=data).train()

    total = 0.0
    for start in (0, 2):
        items = [data[i] for i in range(start, start + 2)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        out = reference(**batch)
        own = _own_router_loss(reference, out)
        task = out.loss - own
        # the task loss as transformers weights it: models whose loss takes ``num_items_in_batch``
        # (the causal LMs) average over the window; for the others (T5, BERT, Switch) transformers
        # adds each micro-batch's mean (it neither normalizes nor divides: their forward takes **kwargs)
        task_weight = 0.5 if case.task == "causal" else 1.0
        total = total + task_weight * task + (own + moe.auxiliary_loss(reference)) / 2
    total.backward()
    checked = 0
    with torch.no_grad():
        trained = dict(converted.named_parameters())
        for name, p in reference.named_parameters():
            if p.grad is None:
                continue
            want = p - lr * p.grad
            delta_want, delta_got = want - p, trained[name] - p
            # two float32 summation orders of the same gradient: relative 1e-4 of the update
            scale = delta_want.norm().item()
            assert (delta_got - delta_want).norm().item() <= 1e-4 * scale + 1e-7, name
            checked += 1
    assert checked


def _own_router_loss(model, out):
    """The router loss an MoE model added to its ``out.loss`` (0 for dense models)."""
    if getattr(out, "aux_loss", None) is not None:
        return model.router_aux_loss_coef * out.aux_loss
    if getattr(out, "encoder_aux_loss", None) is not None:
        return (model.router_aux_loss_coef * (out.encoder_aux_loss + out.decoder_aux_loss)
                + model.router_z_loss_coef * (out.encoder_z_loss + out.decoder_z_loss))
    return torch.zeros(())


def _identical_experts(model):
    """The MoE model with every routed expert a copy of expert 0 (as after upcycling)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            for attr in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
                p = getattr(module, attr, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() >= 2 and "experts" in name:
                    p.copy_(p[:1].expand_as(p))
            if type(module).__name__ == "SwitchTransformersExperts":
                for i in range(1, module.num_experts):
                    module[f"expert_{i}"].load_state_dict(module["expert_0"].state_dict())
    return model


@pytest.mark.parametrize("case", _cases('gradient mask'))
def test_gradient_mask(case):
    _applies(case, "gradient mask")
    original = _original(case.id)
    if case.way == "convert":  # sharing is exact (and allowed) only for identical experts
        original = _identical_experts(original)
        config = MoEConfig(expert_type="mpo", share="central", m=2)
        with torch.no_grad():
            ref = _out(original, _batch(case))
    else:
        config = case.config()
    model = moe.convert(copy.deepcopy(original), config, progress=False).train()
    if case.way == "convert":
        with torch.no_grad():
            assert (_out(model.eval(), _batch(case)) - ref).abs().max().item() <= 1e-4
        model.train()
    shared = moe.shared_parameters(model)
    assert shared
    own = [p for _, m in model.named_modules() if isinstance(m, moe.MPOExpertBank) for p in m.expert_parameters()]
    before = [p.detach().clone() for p in shared + own]
    mask = moe.GradientMask(model, p_b=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = _batch(case)
    mask.begin_step()
    out = _out(model, batch)
    (out.float().pow(2).mean() + moe.auxiliary_loss(model)).backward()
    assert mask.apply()
    opt.step()
    after = shared + own
    assert all(torch.equal(a, b) for a, b in zip(before[:len(shared)], after[:len(shared)]))
    assert any(not torch.equal(a, b) for a, b in zip(before[len(shared):], after[len(shared):]))


@pytest.mark.parametrize("case", _cases('bf16 autocast'))
def test_bf16_autocast(case):
    _applies(case, "bf16 autocast")
    original, converted = _models(case)
    batch = _batch(case)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = _out(original, batch).float(), _out(converted, batch).float()
    assert torch.isfinite(out).all()
    # both rounded to bf16 (eps 2^-8) at different points of a 2-layer model: a few percent
    assert ((out - ref).norm() / ref.norm()).item() <= 0.05


# -- what convert refuses, what it takes from the model ------------------------------------------------
def _mixtral_case(bank="mpo"):
    return next(c for c in CASES if c.id == f"Mixtral-convert-{bank}")


def test_convert_takes_experts_and_top_k_from_the_model():
    original = _original(_mixtral_case().id)
    model = moe.convert(copy.deepcopy(original), MoEConfig(expert_type="dense"), progress=False)
    experts = [m for _, m in model.named_modules() if isinstance(m, moe.RoutedExperts)]
    assert [(e.num_experts, e.top_k) for e in experts] == [(4, 2), (4, 2)]
    # naming the model's own numbers is allowed
    moe.convert(copy.deepcopy(original), MoEConfig(expert_type="dense", num_experts=4, top_k=2), progress=False)


@pytest.mark.parametrize("option, match", [
    (dict(num_experts=8), "num_experts=8 contradicts"),
    (dict(top_k=1), "top_k=1 contradicts the model's router"),
    (dict(router="topk"), "the model's own router is kept"),
    (dict(load_balancing_coef=0.1), "load_balancing_coef"),
    (dict(init_noise=0.01), "init_noise"),
])
def test_convert_refuses_router_options_that_contradict_the_model(option, match):
    original = _original(_mixtral_case().id)
    with pytest.raises(ValueError, match=match):
        moe.convert(copy.deepcopy(original), MoEConfig(expert_type="dense", **option), progress=False)


@pytest.mark.parametrize("share", ["central", "all", [0]])
def test_sharing_differing_experts_is_refused_and_names_fitting(share):
    original = _original(_mixtral_case().id)
    with pytest.raises(ValueError, match="cannot be exact.*fitting shared factors"):
        moe.convert(copy.deepcopy(original), MoEConfig(expert_type="mpo", share=share, m=2), progress=False)
    assert not moe.converted_modules(original)


def test_a_truncated_mpo_bank_is_one_mpo_per_expert():
    original = _original(_mixtral_case().id)
    model = moe.convert(copy.deepcopy(original), MoEConfig(expert_type="mpo", share="none", m=2, max_bond=3),
                        progress=False)
    block = model.model.layers[0].mlp
    bank, W = block.experts.experts.gate, original.model.layers[0].mlp.experts.gate_up_proj[:, :32]
    for e in range(4):  # each expert is the rank-3 truncation of its own matrix (SVD optimal for m=2)
        S = torch.linalg.svdvals(W[e].reshape(8, 4, 8, 4).permute(0, 2, 1, 3).reshape(64, 16).double())
        err = (bank.weights([e])[0].double() - W[e].double()).norm()
        assert abs(err.item() - S[3:].norm().item()) <= 1e-5 * W[e].norm().item()


def test_dense_mlps_of_an_moe_model_only_when_named():
    for arch, dense_names in (("Qwen2-MoE", ["shared_expert"]), ("DeepSeek-V3", ["model.layers.0.mlp", "shared_experts"])):
        case = next(c for c in CASES if c.id == f"{arch}-convert-mpo")
        original = _original(case.id)
        default = moe.convert(copy.deepcopy(original), case.config(), progress=False)
        assert all(n.endswith(".experts") for n in moe.converted_modules(default))
        named = moe.convert(copy.deepcopy(original), case.config(target_modules=["experts"] + dense_names),
                            progress=False).eval()
        names = moe.converted_modules(named)
        assert len(names) > len(moe.converted_modules(default))
        assert any(not n.endswith(".experts") for n in names)
        batch = _batch(case)
        with torch.no_grad():
            assert (_out(named, batch) - _out(original, batch)).abs().max().item() <= 1e-4


class _LookalikeMLP(torch.nn.Module):
    """LLaMA's attribute names, but ``down(act(up x) * gate x)``: not what the adapter reads."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=False)
        self.down_proj = torch.nn.Linear(16, 8, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_a_structurally_recognised_ffn_that_computes_something_else_is_refused():
    model = torch.nn.Sequential(_LookalikeMLP())
    with pytest.raises(ValueError, match="does not compute what the module computes"):
        moe.convert(model, MoEConfig(num_experts=2, m=2), progress=False)


def test_routed_experts_skip_the_sentinel_expert_like_transformers():
    """An expert id ``num_experts`` (transformers' expert-parallel sentinel) adds nothing."""
    original = _original(_mixtral_case().id)
    hf = copy.deepcopy(original.model.layers[0].mlp.experts)
    hf._is_expert_parallel = True  # transformers reads sentinels only under expert parallelism
    model = moe.convert(copy.deepcopy(original), MoEConfig(expert_type="dense"), progress=False)
    ours = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 32, generator=g)
    index = torch.tensor([[0, 4], [4, 1], [2, 3], [3, 0], [1, 2], [4, 4]])
    weights = torch.rand(6, 2, generator=g)
    with torch.no_grad():
        want = hf(x, index, weights)
        assert torch.equal(want[5], torch.zeros(32))
        assert (ours(x, index, weights) - want).abs().max().item() <= 1e-6


def test_architectures_page_holds_the_printed_table(capsys):
    """docs/architectures.md holds the table ``results/make_tables.py architectures`` prints from ``CASES``."""
    import importlib
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "results"))
    try:
        make_tables = importlib.import_module("make_tables")
    finally:
        sys.path.remove(str(root / "results"))
    make_tables.architecture_table()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    page = (root / "docs" / "architectures.md").read_text(encoding="utf-8").splitlines()
    assert len(printed) == 2 + len({(c.arch, c.way) for c in CASES})
    missing = [line for line in printed if line not in page]
    assert not missing, f"docs/architectures.md lacks these rows of the printed table: {missing}"


def test_parameter_count_of_converted_moe_experts():
    """Per expert: gate, up and down (moe hidden 32 x 32) in each of the 2 layers; a token skips E - k = 2."""
    original = _original(_mixtral_case().id)
    model = moe.convert(copy.deepcopy(original), MoEConfig(expert_type="dense"), progress=False)
    count = moe.count_parameters(model)
    assert count.total == sum(p.numel() for p in original.parameters())
    assert (count.per_expert, count.shared, count.moe_layers) == (2 * 3 * 32 * 32, 0, 2)
    assert count.active_per_token == count.total - 2 * count.per_expert
