"""HF Trainer integration: exact resumption with the gradient mask, auxiliary loss under
gradient accumulation."""

import pytest
import torch
from torch.utils.data import Dataset

import tnmoe.moe as moe
from tiny_models import VOCAB, inputs_for, tiny_gpt2
from tnmoe.moe import GradientMask, MoEConfig

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from tnmoe.models.trainer import MASK_STATE_NAME  # noqa: E402

MPOE = MoEConfig(num_experts=2, m=3, share="central", init_noise=0.05)


class Tokens(Dataset):
    """``n`` fixed random sequences of ``seq`` token ids; ``same=True``: all equal. Labels are the
    inputs with the first one ignored (-100): a causal LM never predicts it, so the Trainer's
    token count (``num_items_in_batch``) is the count the model's mean loss divides by, whichever
    way the Trainer counts (GPT-2's class name does not tell it that the loss shifts labels)."""

    def __init__(self, n=16, seq=10, same=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(2, VOCAB, (1 if same else n, seq), generator=g)
        self.rows = rows.expand(n, seq) if same else rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        labels = self.rows[i].clone()
        labels[0] = -100
        return {"input_ids": self.rows[i].clone(), "labels": labels}


class StopAt(TrainerCallback):
    """Stops training after optimizer step ``step`` (its checkpoint is still written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, learning_rate=5e-3,
                weight_decay=0.1, save_strategy="steps", save_steps=4, report_to=[], disable_tqdm=True,
                use_cpu=True, seed=0, logging_steps=1, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _run(out, trainer_cls=moe.MoETrainer, stop_at=None, resume=None, mask_seed=0):
    """Fresh model + mask + trainer, as a new process would build them; returns (model, mask, trainer)."""
    torch.manual_seed(0)
    model = moe.convert(tiny_gpt2(), MPOE, progress=False)
    mask = GradientMask(model, p_b=0.5, seed=mask_seed)
    callbacks = [moe.GradientMaskCallback(mask)] + ([StopAt(stop_at)] if stop_at else [])
    trainer = trainer_cls(model=model, args=_args(out), train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, mask, trainer


def _assert_same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    different = [n for n in pa if not torch.equal(pa[n], pb[n])]
    assert not different, f"{len(different)} parameters differ, e.g. {different[:3]}"


# --- exact resumption ----------------------------------------------------------------------------
def test_resume_is_bit_identical(tmp_path):
    """12 steps in one go == 4 steps, then (fresh model, mask and trainer, as in a new process) 8
    more resumed from checkpoint-4, written into another output folder."""
    full, full_mask, _ = _run(tmp_path / "full")
    assert full_mask.steps == 12 and 0 < full_mask.masked_steps < 12  # p_b = 0.5: a real mixture
    _run(tmp_path / "first", stop_at=4)
    resumed, resumed_mask, _ = _run(tmp_path / "resumed", resume=str(tmp_path / "first" / "checkpoint-4"))
    _assert_same_params(full, resumed)
    assert (resumed_mask.steps, resumed_mask.masked_steps) == (full_mask.steps, full_mask.masked_steps)
    assert torch.equal(resumed_mask.state_dict()["rng"], full_mask.state_dict()["rng"])
    # checkpoint folders are loadable converted models; the last ones are the trained model
    full.eval()
    batch = inputs_for(full)
    with torch.no_grad():
        ref = full(**batch).logits
        for folder in (tmp_path / "full" / "checkpoint-12", tmp_path / "resumed" / "checkpoint-12"):
            loaded = moe.from_pretrained(folder)
            assert not loaded.training
            assert torch.equal(loaded(**batch).logits, ref)
        auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "checkpoint-12")
        assert torch.equal(auto(**batch).logits, ref)


def _draws(n, p_b=0.5, seed=0):
    """Independent reference: a mask that drew ``n`` times in one go."""
    mask = GradientMask([torch.nn.Parameter(torch.zeros(1))], p_b=p_b, seed=seed)
    for _ in range(n):
        mask.apply()
    return mask


def test_plain_trainer_callback_resumes_mask_from_output_dir(tmp_path):
    _run(tmp_path, trainer_cls=Trainer, stop_at=4)
    _, mask, _ = _run(tmp_path, trainer_cls=Trainer, resume=True)  # finds <output_dir>/checkpoint-4
    reference = _draws(12)
    assert (mask.steps, mask.masked_steps) == (12, reference.masked_steps)
    assert torch.equal(mask.state_dict()["rng"], reference.state_dict()["rng"])


def test_plain_trainer_refuses_the_mask_state_of_another_run(tmp_path):
    """A plain Trainer resuming from a checkpoint outside output_dir looks for the mask state in
    output_dir; a checkpoint of the same step there from another run is refused, not loaded."""
    _run(tmp_path / "a", trainer_cls=Trainer, stop_at=4)
    _run(tmp_path / "b", trainer_cls=Trainer, stop_at=4, mask_seed=1)
    with pytest.raises(ValueError, match="another run"):
        _run(tmp_path / "a", trainer_cls=Trainer, resume=str(tmp_path / "b" / "checkpoint-4"), mask_seed=1)
    _, mask, _ = _run(tmp_path / "a", trainer_cls=moe.MoETrainer, resume=str(tmp_path / "b" / "checkpoint-4"),
                      mask_seed=1)  # MoETrainer reads the state from the checkpoint it resumes from
    assert torch.equal(mask.state_dict()["rng"], _draws(12, seed=1).state_dict()["rng"])


def test_resume_without_mask_state_fails_clearly(tmp_path):
    _run(tmp_path, trainer_cls=Trainer, stop_at=4)
    (tmp_path / "checkpoint-4" / MASK_STATE_NAME).unlink()  # e.g. written by an older tnmoe
    for trainer_cls in (Trainer, moe.MoETrainer):
        with pytest.raises(FileNotFoundError, match="no gradient mask state"):
            _run(tmp_path, trainer_cls=trainer_cls, resume=str(tmp_path / "checkpoint-4"))


# --- auxiliary loss under gradient accumulation ----------------------------------------------------
def _ga_model():
    torch.manual_seed(0)
    config = MoEConfig(num_experts=2, m=3, init_noise=0.05, load_balancing_coef=1.0)  # aux loss ~ task loss
    return moe.convert(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), config, progress=False)


def _router_params(model):
    return {n: p for n, p in model.named_parameters() if ".router." in n}


def _reference_step(batch_size, lr):
    """Independent computation: one plain SGD step on (task + aux) of a single batch."""
    model = _ga_model().train()
    rows = Tokens(n=batch_size, same=True)[0]
    batch = {k: v.expand(batch_size, -1) for k, v in rows.items()}
    loss = model(**batch).loss + moe.auxiliary_loss(model)
    loss.backward()
    return {n: -lr * p.grad for n, p in _router_params(model).items()}, loss.item()


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False], ids=["loss-kwargs", "no-loss-kwargs"])
@pytest.mark.parametrize("window", [(2, 2), (4, 4), (4, 3)], ids=["2-of-2", "4-of-4", "partial-3-of-4"])
def test_aux_loss_weighted_like_task_loss_under_accumulation(tmp_path, window, accepts_loss_kwargs):
    """All examples equal: one optimizer step over N micro-batches of B (``gradient_accumulation_steps``
    = G >= N; N < G is the last, partial window of an epoch) must give the update and the logged
    loss of one batch of B, auxiliary loss included."""
    steps, micro_batches = window
    lr, batch = 0.5, 2
    expected_update, expected_loss = _reference_step(batch, lr)
    model = _ga_model()
    before = {n: p.detach().clone() for n, p in _router_params(model).items()}
    args = _args(tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=batch,
                 gradient_accumulation_steps=steps, optim="sgd", learning_rate=lr, weight_decay=0.0,
                 lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no")
    trainer = moe.MoETrainer(model=model, args=args, train_dataset=Tokens(n=batch * micro_batches, same=True))
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs  # GPT-2 accepts them; emulate a model that does not
    trainer.train()
    assert trainer.state.global_step == 1
    for name, p in _router_params(model).items():
        torch.testing.assert_close(p.detach() - before[name], expected_update[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}, {micro_batches} micro-batches: {m}")
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected_loss, rel=1e-4)


# --- mask-aware backward and amortized reconstruction under the Trainer ---------------------------
def _plain_loop(begin_step: bool, steps=6):
    torch.manual_seed(0)
    model = moe.convert(tiny_gpt2(), MPOE, progress=False).train()
    # bit-identity holds where the rebuild's order does not depend on the mask: one matrix at a time.
    # "auto" is "batched" on CUDA or with MALLOC_MMAP_MAX_=0, where a frozen centre is rebuilt as
    # L @ (C @ R), not (L @ C) @ R: other rounding, which AdamW then magnifies
    for _, layer in moe.moe_layers(model):
        for bank in layer.experts.banks().values():
            bank.reconstruct_strategy = "loop"
    mask = GradientMask(model, p_b=0.5, seed=1)  # draws: F T T F T F
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1)
    frozen_grads = []
    for s in range(steps):
        batch = inputs_for(model, batch=2, seq=8, seed=s)
        if begin_step:
            mask.begin_step()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        frozen_grads.append([p.grad is None for p in mask.params])
        mask.apply()
        opt.step()
        opt.zero_grad()
    return model, mask, frozen_grads


def test_mask_drawn_before_the_step_is_bit_identical_and_skips_the_backward():
    post, mask_a, _ = _plain_loop(begin_step=False)
    pre, mask_b, no_grad = _plain_loop(begin_step=True)
    assert (mask_a.steps, mask_a.masked_steps) == (mask_b.steps, mask_b.masked_steps) == (6, mask_a.masked_steps)
    assert 0 < mask_a.masked_steps < 6
    for (n, a), b in zip(post.named_parameters(), pre.parameters()):
        assert torch.equal(a, b), n
    # on masked steps the backward computed no gradient at all for the shared cores
    assert sum(all(flags) for flags in no_grad) == mask_b.masked_steps
    assert all(p.requires_grad for p in mask_b.params)  # switched back on after each step


class RecordGradients(TrainerCallback):
    """Copies every parameter's accumulated gradient just before each optimizer step."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                           if p.grad is not None})


def _assert_gradients_close(a: dict, b: dict, rtol: float) -> None:
    """Each tensor's gradient difference within ``rtol`` of the step's whole gradient norm.

    float32 sums reordered (rebuild once and accumulate dL/dW, vs backpropagate every micro-batch
    through the cores) differ by a few ulps of the summed terms' magnitudes, so the bound is
    relative to the gradient's scale, not to each entry (a near-zero entry is a cancellation of
    large terms and carries their rounding).
    """
    assert a.keys() == b.keys()
    scale = torch.sqrt(sum(g.double().square().sum() for g in b.values()))
    worst = max(((a[n].double() - b[n].double()).norm() / scale, n) for n in b)
    assert worst[0] <= rtol, f"{worst[1]}: gradient difference {float(worst[0]):.2e} of the gradient norm"


def test_trainer_amortized_reconstruction_matches_per_micro_batch(tmp_path):
    """Reconstructing once per optimizer step gives the accumulated core gradients that
    backpropagating each micro-batch through the cores gives. Compared: the gradients at every
    step (what the claim is about), under SGD, so parameters differ only by ``lr`` times those
    gradients' rounding (Adam's normalisation would blow near-zero gradients' rounding up)."""
    results = {}
    for amortize in (True, False):
        torch.manual_seed(0)
        model = moe.convert(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), MPOE, progress=False)
        record = RecordGradients(model)
        trainer = moe.MoETrainer(model=model, args=_args(tmp_path / str(amortize), max_steps=3, save_strategy="no",
                                                         gradient_accumulation_steps=3, optim="sgd",
                                                         weight_decay=0.0, per_device_train_batch_size=2),
                                 train_dataset=Tokens(n=32), callbacks=[record])
        trainer.amortize_reconstruction = amortize
        calls = []
        bank = moe.moe_layers(model)[0][1].experts.up
        original = bank._rebuild
        bank._rebuild = lambda *a: calls.append(1) or original(*a)
        trainer.train()
        results[amortize] = (record.steps, {n: p.detach().clone() for n, p in model.named_parameters()}, len(calls))
    (amortized, amortized_params, rebuilds), (plain, plain_params, plain_rebuilds) = results[True], results[False]
    assert (rebuilds, plain_rebuilds) == (3, 9)  # once per optimizer step vs once per micro-batch
    assert len(amortized) == len(plain) == 3
    core_grads = [n for n in plain[0] if ".cores." in n]
    assert core_grads, "no MPO core received a gradient"
    for step_a, step_p in zip(amortized, plain):
        _assert_gradients_close(step_a, step_p, rtol=1e-4)
    for n in plain_params:  # SGD: parameters differ by lr (5e-3) times the gradients' rounding
        torch.testing.assert_close(amortized_params[n], plain_params[n], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{n}: {m}")


def _checkpointed_run(out, use_reentrant, accumulation=1, checkpointing=True):
    """2 SGD steps of a fresh model (activation checkpointing on or off); returns (parameters,
    the accumulated gradients before each optimizer step)."""
    torch.manual_seed(0)
    model = moe.convert(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), MPOE, progress=False)
    new = "activation_checkpointing" in TrainingArguments.__dataclass_fields__  # the name since transformers 5.x
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    ckpt = {name: True, f"{name}_kwargs": {"use_reentrant": use_reentrant}} if checkpointing else {}
    args = _args(out, max_steps=2, save_strategy="no", per_device_train_batch_size=2,
                 gradient_accumulation_steps=accumulation, optim="sgd", weight_decay=0.0, **ckpt)
    record = RecordGradients(model)
    trainer = moe.MoETrainer(model=model, args=args, train_dataset=Tokens(n=16), callbacks=[record])
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, record.steps


def test_trainer_with_activation_checkpointing_and_accumulation_matches_without_checkpointing(tmp_path):
    """Checkpointing re-runs MPO layers in the backward, so amortized reconstruction is skipped;
    the accumulated gradients at every step equal an uncheckpointed run's. Compared under SGD:
    after AdamW, float32 reordering in near-zero gradients becomes parameter differences of up to
    lr, which depend on the CPU's kernels (here 13% of the old tolerance)."""
    checkpointed, checkpointed_grads = _checkpointed_run(tmp_path / "ckpt", use_reentrant=False, accumulation=2)
    plain, plain_grads = _checkpointed_run(tmp_path / "plain", use_reentrant=False, accumulation=2,
                                           checkpointing=False)
    assert len(checkpointed_grads) == len(plain_grads) == 2
    assert any(".cores." in n for n in plain_grads[0]), "no MPO core received a gradient"
    for step_c, step_p in zip(checkpointed_grads, plain_grads):
        _assert_gradients_close(step_c, step_p, rtol=1e-4)
    for n in plain:  # SGD: parameters differ by lr (5e-3) times the gradients' rounding
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_trainer_refuses_an_aux_loss_without_gradient_under_reentrant_checkpointing(tmp_path):
    with pytest.raises(RuntimeError, match="auxiliary loss carries no gradient"):
        _checkpointed_run(tmp_path, use_reentrant=True)


class RaiseBeforeStep(TrainerCallback):
    """Raises inside optimizer step ``step``, after its backward and before the mask is applied."""

    def __init__(self, step):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise KeyboardInterrupt("interrupted inside a masked step")
        return control


def test_interrupted_masked_step_gives_the_shared_tensors_back(tmp_path):
    """p_b = 1: every step is masked, so at the interrupt the shared tensors have requires_grad
    off; they must be trainable again afterwards (else every later run silently skips them)."""
    torch.manual_seed(0)
    model = moe.convert(tiny_gpt2(), MPOE, progress=False)
    mask = GradientMask(model, p_b=1.0, seed=0)
    trainer = moe.MoETrainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=Tokens(),
                             callbacks=[RaiseBeforeStep(2), moe.GradientMaskCallback(mask)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert mask.steps == 1 and mask.params and all(p.requires_grad for p in mask.params)
    # a new run with a new mask (p_b = 0) updates them
    before = [p.detach().clone() for p in mask.params]
    again = GradientMask(model, p_b=0.0)
    moe.MoETrainer(model=model, args=_args(tmp_path, save_strategy="no", max_steps=1), train_dataset=Tokens(),
                   callbacks=[moe.GradientMaskCallback(again)]).train()
    assert all(not torch.equal(b, p) for b, p in zip(before, again.params))


def test_release_cancels_a_drawn_decision():
    model = moe.convert(tiny_gpt2(), MPOE, progress=False)
    mask = GradientMask(model, p_b=1.0)
    assert mask.begin_step() and not any(p.requires_grad for p in mask.params)
    mask.release()
    assert all(p.requires_grad for p in mask.params) and mask.steps == 0
    assert mask.begin_step()  # a new decision is drawn, and applies as usual
    assert mask.apply() and mask.steps == 1 and all(p.requires_grad for p in mask.params)


@pytest.mark.parametrize("reuse_mask", [False, True])
def test_plain_trainer_after_an_interrupted_masked_step_trains_the_shared_tensors(tmp_path, reuse_mask):
    """A plain Trainer has no ``finally`` that releases the mask: a new mask over the same tensors,
    or the callback of the next Trainer, must switch them back on before the optimizer is built
    (else they are silently left out of it and never trained)."""
    torch.manual_seed(0)
    model = moe.convert(tiny_gpt2(), MPOE, progress=False)
    mask = GradientMask(model, p_b=1.0, seed=0)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=Tokens(),
                callbacks=[RaiseBeforeStep(2), moe.GradientMaskCallback(mask)]).train()
    assert mask.params and not any(p.requires_grad for p in mask.params)
    before = [p.detach().clone() for p in mask.params]
    with pytest.warns(UserWarning, match="requires_grad off"):
        if reuse_mask:
            mask.p_b = 0.0
            again = mask
        else:
            again = GradientMask(model, p_b=0.0)
        trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="no", max_steps=1), train_dataset=Tokens(),
                          callbacks=[moe.GradientMaskCallback(again)])
    trainer.train()
    assert all(p.requires_grad for p in again.params)
    assert all(not torch.equal(b, p) for b, p in zip(before, again.params))


def test_mask_callback_refuses_an_optimizer_built_while_the_shared_tensors_were_frozen(tmp_path):
    torch.manual_seed(0)
    model = moe.convert(tiny_gpt2(), MPOE, progress=False)
    mask = GradientMask(model, p_b=1.0, seed=0)
    trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="no", max_steps=1), train_dataset=Tokens(),
                      callbacks=[moe.GradientMaskCallback(mask)])
    mask.begin_step()  # a step drawn and never applied after the Trainer was built
    trainer.create_optimizer()  # built while the masked tensors are frozen
    with pytest.raises(RuntimeError, match="never update them"):
        trainer.train()


def test_mask_state_from_another_configuration_warns_and_wins():
    model = moe.convert(tiny_gpt2(), MPOE, progress=False)
    saved = GradientMask(model, p_b=0.5, seed=1).state_dict()
    mask = GradientMask(model, p_b=0.1, seed=123)
    with pytest.warns(UserWarning, match="p_b=0.5, seed=1"):
        mask.load_state_dict(saved)
    assert (mask.p_b, mask.seed) == (0.5, 1)


class _OutOfMemoryAt:
    """Forward pre-hook raising a CPU out-of-memory error at forward call ``n`` (HF's
    ``auto_find_batch_size`` then retries the training loop with a smaller batch)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: simulated")


@pytest.mark.parametrize("oom_at", [1, 2])
def test_retry_after_out_of_memory_inside_an_accumulation_window_equals_a_clean_run(tmp_path, oom_at):
    """OOM in micro-batch 2 of 3: micro-batch 1's MPO gradient was accumulated on the banks; the
    retried loop must start from zero, as a clean run at the retry's batch size does."""
    def run(batch, oom_at=None):
        torch.manual_seed(0)
        model = moe.convert(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), MPOE, progress=False)
        if oom_at:
            model.transformer.register_forward_pre_hook(_OutOfMemoryAt(oom_at))
        args = _args(tmp_path / f"{batch}-{oom_at}", max_steps=1, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=3, auto_find_batch_size=oom_at is not None, save_strategy="no",
                     optim="sgd", learning_rate=1e-2, weight_decay=0.0, lr_scheduler_type="constant")
        trainer = moe.MoETrainer(model=model, args=args, train_dataset=Tokens(n=64, same=True))
        trainer.train()
        return model, trainer

    retried, trainer = run(4, oom_at=oom_at)
    assert trainer._train_batch_size == 3  # accelerate's retry: 4 * 0.9 rounded down
    clean, _ = run(3)
    _assert_same_params(retried, clean)


def test_mask_callback_refuses_deepspeed(tmp_path):
    model = moe.convert(tiny_gpt2(), MPOE, progress=False)
    callback = moe.GradientMaskCallback(GradientMask(model, p_b=0.5))
    args = _args(tmp_path, save_strategy="no")
    args.deepspeed_plugin = object()  # what TrainingArguments sets for a DeepSpeed run (not installed here)
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        callback.on_train_begin(args, None, None)
