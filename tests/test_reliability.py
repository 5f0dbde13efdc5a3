"""Issue 21: checkpoints of wrapped and tied models, a base model whose config differs, weight
file checksums, a gradient mask used by one rank, an empty training batch, ``factors`` for a
dimension the model lacks. Each test fails on the code before the fix."""

import json
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import xxhash
from torch import nn

import tnmoe.moe as moe
from one_rank_mask import one_rank_applies
from tiny_ffn import TinyFFN, tiny_ffn_registered
from tiny_models import VOCAB, inputs_for, tiny_gpt2
from tnmoe.moe import GradientMask, MoEConfig

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, TrainingArguments  # noqa: E402

CFG = MoEConfig(num_experts=2, m=3, init_noise=0.05)


def _converted(seed=0, **config):
    torch.manual_seed(seed)
    return moe.convert(tiny_gpt2(**config), CFG, progress=False).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _up_banks(model):
    return [layer.experts.up for _, layer in moe.moe_layers(model)]


# --- 1. wrapped models ------------------------------------------------------------------------------
def _assert_own_checkpoint(folder: Path, model, batch, ref):
    """``folder`` is ``model``'s checkpoint, as if saved unwrapped: names, class, exact reload."""
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in _keys(folder))
    assert json.loads((folder / "config.json").read_text())["architectures"] == [type(model).__name__]
    for loaded in (AutoModelForCausalLM.from_pretrained(folder), moe.from_pretrained(folder)):
        assert torch.equal(_logits(loaded, batch), ref)


def test_compiled_and_data_parallel_models_save_the_model_inside(tmp_path):
    """Before: the compiled model's folder had ``_orig_mod.*`` keys and loaded with
    uninitialized cores (NaN logits); DataParallel's had no config.json and ``module.*`` keys."""
    model = _converted()
    batch = inputs_for(model)
    ref = _logits(model, batch)
    moe.save_pretrained(torch.compile(model), tmp_path / "compiled")  # wrapping only: nothing is compiled
    _assert_own_checkpoint(tmp_path / "compiled", model, batch, ref)
    moe.save_pretrained(nn.DataParallel(torch.compile(model)), tmp_path / "nested")
    _assert_own_checkpoint(tmp_path / "nested", model, batch, ref)
    wrapped_inside = _converted()
    wrapped_inside.transformer.h[0] = torch.compile(wrapped_inside.transformer.h[0])
    with pytest.raises(ValueError, match=r"submodule 'transformer\.h\.0' is wrapped.*module\.compile\(\)"):
        moe.save_pretrained(wrapped_inside, tmp_path / "inside")
    assert not (tmp_path / "inside").exists()


def test_distributed_data_parallel_model_saves_the_model_inside_and_sharded_is_refused(tmp_path):
    """Before: DDP's folder had no config.json and ``module.*`` names. An FSDP2-sharded model
    (a one-rank mesh here) is refused with what to do instead."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    model = _converted()
    batch = inputs_for(model)
    ref = _logits(model, batch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        moe.save_pretrained(nn.parallel.DistributedDataParallel(model), tmp_path / "ddp")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        sharded = fully_shard(_converted(), mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match=r"sharded by FSDP2 .*full_state_dict=True"):
            moe.save_pretrained(sharded, tmp_path / "fsdp")
    finally:
        dist.destroy_process_group()
    _assert_own_checkpoint(tmp_path / "ddp", model, batch, ref)
    assert not (tmp_path / "fsdp").exists()


# --- 2. cores tied across layers ----------------------------------------------------------------
def _tied_model(seed=0):
    """Layer 1's central up core is layer 0's (README's cross-layer sharing); the shared core is
    then perturbed so no value coincides with an untied model's."""
    model = _converted(seed)
    up = _up_banks(model)
    up[1].tie_cores(up[0], [1])
    with torch.no_grad():
        up[0].cores[1].mul_(1.5)
    return model


def _assert_tied(model):
    up = _up_banks(model)
    assert up[1].cores[1] is up[0].cores[1]
    assert up[1].cores[0] is not up[0].cores[0]


def test_cores_tied_across_layers_reload_tied_and_exact(tmp_path):
    """Before: moe.from_pretrained refused save_pretrained's own folder (missing the tied core)."""
    model = _tied_model()
    batch = inputs_for(model)
    ref = _logits(model, batch)
    moe.save_pretrained(model, tmp_path / "ck")
    keys = _keys(tmp_path / "ck")
    assert "transformer.h.0.mlp.experts.up.cores.1" in keys and "transformer.h.1.mlp.experts.up.cores.1" not in keys
    record = json.loads((tmp_path / "ck" / "config.json").read_text())["tnmoe"]
    assert record["tied_cores"] == {"transformer.h.1.mlp.experts.up.cores.1": "transformer.h.0.mlp.experts.up.cores.1"}
    loaded = [moe.from_pretrained(tmp_path / "ck"), AutoModelForCausalLM.from_pretrained(tmp_path / "ck"),
              moe.from_pretrained(tmp_path / "ck", tiny_gpt2())]
    for m in loaded:
        _assert_tied(m)
        assert torch.equal(_logits(m, batch), ref)
    # the reloaded model (tnmoe's class) writes transformers checkpoints with the tie recorded
    loaded[1].save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _assert_tied(again)
    assert torch.equal(_logits(again, batch), ref)
    # an untied converted model is tied as recorded; one tied otherwise is refused
    untied = _converted(seed=3)
    moe.load_weights(untied, tmp_path / "ck")
    _assert_tied(untied)
    assert torch.equal(_logits(untied, batch), ref)
    other = _converted(seed=3)
    _up_banks(other)[1].tie_cores(_up_banks(other)[0], [0])
    with pytest.raises(ValueError, match="ties cores"):
        moe.load_weights(other, tmp_path / "ck")


def test_untied_checkpoint_into_a_tied_model_is_refused(tmp_path):
    """Two stored values for one tensor of the model: before, the later silently won."""
    moe.save_pretrained(_converted(), tmp_path)
    model = _converted()
    up = _up_banks(model)
    up[1].tie_cores(up[0], [1])
    with pytest.raises(ValueError, match="ties cores"):
        moe.load_weights(model, tmp_path)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=10):
        self.rows = torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i].clone(), "labels": self.rows[i].clone()}


def _train_tied(out: Path, max_steps: int, resume=None):
    """MoETrainer on the tied model, a checkpoint every step."""
    model = _tied_model()
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, save_strategy="steps", save_steps=1, report_to=[],
                             disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0)
    moe.MoETrainer(model=model, args=args, train_dataset=_Tokens()).train(resume_from_checkpoint=resume)
    return model


def test_moe_trainer_checkpoints_tied_cores_and_resumes_exactly(tmp_path):
    """Before: the Trainer's first checkpoint raised transformers' "shared tensors" error."""
    full = _train_tied(tmp_path / "full", max_steps=2)
    _assert_tied(full)
    batch = inputs_for(full)
    final = moe.from_pretrained(tmp_path / "full" / "checkpoint-2")
    _assert_tied(final)
    assert torch.equal(_logits(final, batch), _logits(full.eval(), batch))
    resumed = _train_tied(tmp_path / "resumed", max_steps=2, resume=str(tmp_path / "full" / "checkpoint-1"))
    _assert_tied(resumed)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# --- 3. a base model whose config differs ---------------------------------------------------------
def test_base_model_with_another_config_is_refused(tmp_path):
    """Before: it loaded and computed another function (logits off by up to 0.85)."""
    model = _converted()
    moe.save_pretrained(model, tmp_path)
    batch = inputs_for(model)
    changed = dict(activation_function="relu", layer_norm_epsilon=1e-3)
    for load in (lambda: moe.from_pretrained(tmp_path, tiny_gpt2(**changed)),
                 lambda: moe.load_weights(_converted(**changed), tmp_path)):
        with pytest.raises(ValueError, match=r"activation_function: checkpoint 'gelu_new', model 'relu'; "
                                             r"layer_norm_epsilon: checkpoint 1e-05, model 0\.001\. .*"
                                             r"accept_config_differences=\['activation_function', 'layer_norm_epsilon'\]"):
            load()
    with pytest.raises(ValueError, match=r"in fields that change what it computes: layer_norm_epsilon: "):
        moe.from_pretrained(tmp_path, tiny_gpt2(**changed), accept_config_differences=["activation_function"])
    accepted = moe.from_pretrained(tmp_path, tiny_gpt2(**changed), accept_config_differences=list(changed))
    assert moe.get_moe_config(accepted) == CFG  # loaded as asked; it computes the other function
    assert not torch.allclose(_logits(accepted, batch), _logits(model, batch))
    with pytest.raises(ValueError, match=r"\['layer_norm_epsilom'\], which are not fields"):
        moe.from_pretrained(tmp_path, tiny_gpt2(), accept_config_differences=["layer_norm_epsilom"])
    same = moe.from_pretrained(tmp_path, tiny_gpt2(use_cache=False, output_hidden_states=True))  # no function change
    assert torch.equal(_logits(same, batch), _logits(model, batch))


# --- 7. weight file checksums ---------------------------------------------------------------------
def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the tensor data (past safetensors' JSON header), as a bad disk would."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_damaged_weight_file_is_detected_and_opt_out_loads_it(tmp_path):
    """Before: a flipped byte loaded without complaint (logits off by up to 1e4)."""
    model = _converted()
    batch = inputs_for(model)
    moe.save_pretrained(model, tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["tnmoe"]
    assert record == json.loads((tmp_path / "tnmoe_config.json").read_text())
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    assert record["weight_files"] == {"model.safetensors": {"xxh3_128": xxhash.xxh3_128(data).hexdigest(),
                                                            "bytes": len(data)}}
    _flip_tensor_byte(weights)
    for load in (lambda: moe.from_pretrained(tmp_path), lambda: AutoModelForCausalLM.from_pretrained(tmp_path),
                 lambda: moe.from_pretrained(tmp_path, tiny_gpt2()), lambda: moe.load_weights(_converted(), tmp_path)):
        with pytest.raises(ValueError, match=r"model\.safetensors is damaged.*verify_checksums=False"):
            load()
    unchecked = moe.from_pretrained(tmp_path, verify_checksums=False)
    assert not torch.equal(_logits(unchecked, batch), _logits(model, batch))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path, verify_checksums=False), batch),
                       _logits(unchecked, batch))


def test_checksums_never_outlive_their_weights(tmp_path):
    """A loaded model's config keeps no checksum, so transformers' save of it (other weights)
    reloads; a folder written without checksums loads unchecked."""
    model = _converted()
    batch = inputs_for(model)
    moe.save_pretrained(model, tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert "weight_files" not in loaded.config.tnmoe and "weight_files" not in moe.from_pretrained(tmp_path / "ck").config.tnmoe
    with torch.no_grad():
        loaded.lm_head.weight.mul_(2.0)  # new weights under the loaded config
    loaded.save_pretrained(tmp_path / "hf")
    assert "weight_files" not in json.loads((tmp_path / "hf" / "config.json").read_text())["tnmoe"]
    assert torch.equal(_logits(moe.from_pretrained(tmp_path / "hf"), batch), _logits(loaded, batch))
    moe.save_pretrained(model, tmp_path / "plain", checksums=False)
    assert "weight_files" not in json.loads((tmp_path / "plain" / "config.json").read_text())["tnmoe"]
    assert torch.equal(_logits(moe.from_pretrained(tmp_path / "plain"), batch), _logits(model, batch))


# --- 4. a gradient mask used by one rank ---------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradient_mask_used_by_one_rank_fails_with_a_timeout_naming_process_group(tmp_path):
    """Before: rank 0's apply() blocked forever (here: the test failed after 120 s). Two spawned
    interpreters importing torch and tnmoe."""
    ctx = mp.start_processes(one_rank_applies, args=(2, _free_port(), str(tmp_path), 1.0), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1) and time.monotonic() < deadline:
        pass
    alive = [p.pid for p in ctx.processes if p.is_alive()]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert not alive, "apply() on one rank still blocked after 120 s"
    waited, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "process_group=" in message and "every rank of the group must call apply()" in message
    assert 1.0 <= float(waited) < 30


def test_gradient_mask_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        GradientMask([nn.Parameter(torch.zeros(1))], timeout=0)


# --- 5. an empty training batch -----------------------------------------------------------------
def test_empty_batch_trains_like_linear():
    """Before: the output did not require grad, so ``(out.sum() + aux).backward()`` raised."""
    with tiny_ffn_registered():
        net = moe.convert(nn.Sequential(TinyFFN()), MoEConfig(num_experts=2, m=2), progress=False)
    layer = net[0].train()
    x = torch.randn(2, 0, 8, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 0, 8) and out.requires_grad and layer.last_aux_loss.requires_grad
    (out.sum() + moe.auxiliary_loss(net)).backward()
    linear = nn.Linear(8, 8)
    linear(x).sum().backward()
    assert torch.equal(linear.weight.grad, torch.zeros(8, 8))  # the reference: zero gradients
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
    assert float(layer.last_aux_loss.detach()) == 0.0 and layer.last_stats.num_tokens == 0
    with torch.no_grad():
        assert not layer(torch.randn(2, 0, 8)).requires_grad


# --- 6. factors for a dimension the model lacks -----------------------------------------------------
def test_factors_for_a_dimension_the_model_lacks_are_an_error():
    """Before: ``{100: ...}`` was ignored without a word."""
    model = tiny_gpt2()
    assert moe.ffn_dimensions(model) == [32, 128]
    with pytest.raises(ValueError, match=r"dimensions \[100\], which no converted FFN.*dimensions are \[32, 128\]"):
        moe.convert(model, MoEConfig(num_experts=2, factors={100: [4, 25, 1], 32: [2, 4, 4], 128: [4, 8, 4]}),
                    progress=False)
    assert not moe.moe_layers(model)  # left unchanged
    moe.convert(model, MoEConfig(num_experts=2, factors={32: [2, 4, 4], 128: [4, 8, 4]}), progress=False)
    assert _up_banks(model)[0].in_factors == [2, 4, 4]
