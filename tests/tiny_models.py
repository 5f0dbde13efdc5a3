"""Tiny transformers models built from configs (no hub access), and a routing recorder."""

import contextlib

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 100


def tiny_gpt2(**kw):
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=0, eos_token_id=1, **kw)
    return GPT2LMHeadModel(cfg)


def tiny_t5(gated: bool = False, **kw):
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=VOCAB,
                   feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0, **kw)
    return T5ForConditionalGeneration(cfg)


#: the tiny Mixtral's hidden size, expert intermediate size, experts and experts per token
MIXTRAL_DIMS = (32, 48, 4, 2)


def tiny_mixtral(dtype=torch.float64, layers: int = 2, seed: int = 0):
    """A Mixtral-architecture causal LM (:data:`MIXTRAL_DIMS`, eager experts), seeded, in eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    d, ff, experts, top_k = MIXTRAL_DIMS
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=64,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, experts_implementation="eager")
    return MixtralForCausalLM(cfg).to(dtype).eval()


def token_batches(n: int = 3, batch: int = 4, seq: int = 16, seed: int = 0) -> list[dict]:
    """``n`` batches ``{"input_ids": (batch, seq)}`` of random ids in ``[3, VOCAB)``."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g)} for _ in range(n)]


def tiny_bert(num_labels: int = 2, **kw):
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=VOCAB, num_labels=num_labels, **kw)
    return BertForSequenceClassification(cfg)


def inputs_for(model, batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    if model.config.model_type == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, VOCAB, (batch, 5), generator=g)}
    return {"input_ids": ids}


@contextlib.contextmanager
def recorded_routing(model):
    """Inside: every router call of ``model``'s MoE layers appends its ``expert_index`` (a copy)
    to the yielded list, in call order."""
    from tnmoe.moe import moe_layers

    picks = []
    hooks = [layer.router.register_forward_hook(lambda mod, args, out: picks.append(out.expert_index.clone()))
             for _, layer in moe_layers(model)]
    try:
        yield picks
    finally:
        for hook in hooks:
            hook.remove()
