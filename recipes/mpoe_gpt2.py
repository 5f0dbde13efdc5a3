"""GPT-2 language modelling on WikiText-2 with dense / +MoE / +Switch / +MPOE variants
(MPOE Table 1, NLG part): test perplexity, and generated continuations scored with BLEU-2/4
against the true continuations and Self-BLEU-2 (diversity; lower is more diverse).

    # fine-tune pretrained GPT-2 (hub) with MPOE
    python recipes/mpoe_gpt2.py --model gpt2 --variant mpoe --output-dir runs/gpt2-mpoe
    # local text files (one paragraph a line), a small GPT-2 trained from scratch with its own BPE
    python recipes/mpoe_gpt2.py --from-scratch --train-tokenizer 8192 --variant dense \\
        --train-file wikitext-2/valid.txt --test-file wikitext-2/test.txt --save-model --output-dir runs/base

Data: ``--train-file/--validation-file/--test-file`` (text, one paragraph a line), or
``--dataset wikitext --dataset-config wikitext-2-raw-v1`` from the hub through ``datasets``.
Writes ``<output-dir>/results.json`` (+ the model with ``--save-model``); nothing on failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_io import RecipeError, Timer, atomic_output_dir, finish_run, run_main  # noqa: E402
from training import add_training_args, make_trainer, run_record, start_run  # noqa: E402
from variants import add_moe_args, prepare_model  # noqa: E402

import tnmoe.moe as moe  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", help="hub name or local path of a causal LM")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--from-scratch", action="store_true", help="build a GPT-2 from --n-* sizes instead")
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-inner", type=int, default=None, help="FFN size (default 4 * n_embd)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer name/path (default: --model's)")
    ap.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB",
                    help="train a byte-level BPE of this vocab size on the training text")
    ap.add_argument("--train-file", default=None)
    ap.add_argument("--validation-file", default=None)
    ap.add_argument("--test-file", default=None)
    ap.add_argument("--dataset", default=None, help="hub dataset, e.g. wikitext")
    ap.add_argument("--dataset-config", default="wikitext-2-raw-v1")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--max-train-blocks", type=int, default=None)
    ap.add_argument("--max-test-blocks", type=int, default=None)
    ap.add_argument("--num-generate", type=int, default=32, help="prompts for BLEU/Self-BLEU (0: skip)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--generate-tokens", type=int, default=32)
    add_training_args(ap, epochs=1, lr=5e-4, warmup_ratio=0.05, fp16=True)
    add_moe_args(ap)
    return ap


def read_lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"text file {p} not found")
    return [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


def load_texts(args) -> dict[str, list[str]]:
    if args.dataset:
        import datasets

        ds = datasets.load_dataset(args.dataset, args.dataset_config)
        return {k: [t for t in ds[s]["text"] if t.strip()] for k, s in
                (("train", "train"), ("validation", "validation"), ("test", "test")) if s in ds}
    if not args.train_file or not args.test_file:
        raise RecipeError("give --train-file and --test-file (or --dataset NAME)")
    texts = {"train": read_lines(args.train_file), "test": read_lines(args.test_file)}
    if args.validation_file:
        texts["validation"] = read_lines(args.validation_file)
    return texts


def train_bpe(lines: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def blocks_of(tok, lines: list[str], block: int, limit: int | None) -> torch.Tensor:
    ids: list[int] = []
    for ln in lines:
        ids += tok(ln.strip())["input_ids"] + [tok.eos_token_id]
    n = len(ids) // block
    if limit:
        n = min(n, limit)
    if n == 0:
        raise RecipeError(f"not enough text for one block of {block} tokens")
    return torch.tensor(ids[: n * block]).view(n, block)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int, quiet: bool) -> tuple[float, float]:
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(blocks), batch_size), desc="test perplexity", leave=False, disable=quiet):
        x = blocks[i:i + batch_size].to(model.device)
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return math.exp(nll / count), nll / count


@torch.no_grad()
def generation_scores(model, tok, lines, args) -> dict:
    """BLEU-2/4 of sampled continuations vs the true ones, and Self-BLEU-2 among samples."""
    from sacrebleu.metrics import BLEU

    need = args.prompt_tokens + args.generate_tokens
    prompts, refs = [], []
    for ln in lines:
        ids = tok(ln.strip())["input_ids"]
        if len(ids) >= need:
            prompts.append(ids[: args.prompt_tokens])
            refs.append(tok.decode(ids[args.prompt_tokens:need]))
        if len(prompts) == args.num_generate:
            break
    if len(prompts) < 2:
        return {}
    model.eval()
    torch.manual_seed(args.seed)
    hyps = []
    for p in tqdm(prompts, desc="generating", leave=False, disable=args.quiet):
        out = model.generate(torch.tensor([p], device=model.device), max_new_tokens=args.generate_tokens,
                             do_sample=True, top_k=40, pad_token_id=tok.eos_token_id)
        hyps.append(tok.decode(out[0, len(p):], skip_special_tokens=True))
    bleu2, bleu4 = BLEU(max_ngram_order=2), BLEU(max_ngram_order=4)
    self_bleu = [BLEU(max_ngram_order=2, effective_order=True).sentence_score(
        h, [o for j, o in enumerate(hyps) if j != i]).score for i, h in enumerate(hyps)]
    return {"bleu2": bleu2.corpus_score(hyps, [refs]).score, "bleu4": bleu4.corpus_score(hyps, [refs]).score,
            "self_bleu2": sum(self_bleu) / len(self_bleu), "num_generated": len(hyps),
            "samples": [{"reference": r, "generated": h} for r, h in list(zip(refs, hyps))[:3]]}


def study_metrics(result: dict) -> dict[str, float]:
    """The metrics a study averages: ``test_perplexity`` and, when generated, BLEU-2/4 and Self-BLEU-2."""
    return {k: result[k] for k in ("test_perplexity", "bleu2", "bleu4", "self_bleu2") if k in result}


def main(argv: list[str] | None = None) -> dict:
    """Train and score one variant; returns (and writes) the ``results.json`` dict."""
    args = build_parser().parse_args(argv)
    if args.train_tokenizer and not args.from_scratch:
        raise RecipeError("--train-tokenizer needs --from-scratch: a pretrained model's embeddings are indexed "
                          "by its own tokenizer's ids, so new BPE ids would silently pick unrelated rows")
    start_run(args)
    texts = load_texts(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if args.train_tokenizer:
        tok = train_bpe(texts["train"], args.train_tokenizer)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        except (OSError, ValueError) as err:
            raise RecipeError(f"cannot load tokenizer {args.tokenizer or args.model!r}: {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if args.from_scratch:
        cfg = GPT2Config(vocab_size=len(tok), n_positions=max(args.block_size, 128), n_embd=args.n_embd,
                         n_layer=args.n_layer, n_head=args.n_head, n_inner=args.n_inner,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model)
        except (OSError, ValueError) as err:
            raise RecipeError(f"cannot load model {args.model!r}: {err}") from None
    train_blocks = blocks_of(tok, texts["train"], args.block_size, args.max_train_blocks)
    test_blocks = blocks_of(tok, texts["test"], args.block_size, args.max_test_blocks)

    def calibration(n: int) -> list[dict]:
        """Batches of 16 of the first ``n`` training blocks (``--conversion data-aware`` / ``whitened-svd``)."""
        blocks = train_blocks[:n]
        return [{"input_ids": blocks[i:i + 16]} for i in range(0, len(blocks), 16)]

    model, mask = prepare_model(model, args, calibration)
    moe_cfg = moe.get_moe_config(model)
    if not args.quiet:
        moe.print_trainable_parameters(model)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(train_blocks)

        def __getitem__(self, i):
            return {"input_ids": train_blocks[i], "labels": train_blocks[i]}

    with atomic_output_dir(args.output_dir) as out:
        steps = args.epochs * -(-len(train_blocks) // args.batch_size)
        trainer = make_trainer(model, args, out, Blocks(), mask, lr=args.lr, lr_scheduler="cosine",
                               logging_steps=max(1, int(steps) // 8))
        with Timer() as timer:
            trainer.train()
        ppl, nll = perplexity(model, test_blocks, max(args.batch_size, 16), args.quiet)
        gen = generation_scores(model, tok, texts["test"], args) if args.num_generate else {}
        result = {
            "model": "from-scratch" if args.from_scratch else args.model, "variant": args.variant,
            "m": args.m if moe_cfg is not None and moe_cfg.expert_type == "mpo" else None,
            "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "block_size": args.block_size,
            "train_tokens": train_blocks.numel(), "test_tokens": test_blocks.numel(),
            "test_tokens_scored": test_blocks.shape[0] * (test_blocks.shape[1] - 1),
            "test_perplexity": ppl, "test_nll": nll, **{k: v for k, v in gen.items()},
            **run_record(model, mask, timer, argv, trainer.state.global_step),
        }
        finish_run(out, result, model, tok, args.save_model)
    if not args.quiet:
        print(json.dumps({k: result.get(k) for k in ("variant", "test_perplexity", "bleu2", "bleu4",
                                                     "self_bleu2", "train_seconds", "total_params")}, indent=2))
    return result


if __name__ == "__main__":
    run_main(main)
