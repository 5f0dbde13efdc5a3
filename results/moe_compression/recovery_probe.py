"""Why the study's recovery fine-tune raises even the uncompressed model's PPL: the seed-1 base
model of `recipes/moe_compression.py` (its reduced-scale settings) fine-tuned by several recovery
settings, WikiText-2 test PPL on the study's 128 test blocks. Writes recovery_probe.json.

    OMP_NUM_THREADS=1 python results/moe_compression/recovery_probe.py
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
import moe_compression as mc  # noqa: E402
from mpoe_gpt2 import blocks_of, perplexity, read_lines  # noqa: E402
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup  # noqa: E402

STUDY = ["--seeds", "1", "--base-epochs", "2", "--max-test-blocks", "128", "--threads", "1", "--quiet"]
#: (lr, batch size, steps, schedule): the study's setting first
SETTINGS = [(1e-4, 4, 50, "constant"), (1e-4, 4, 50, "cosine"), (3e-5, 4, 50, "cosine"),
            (1e-4, 16, 50, "cosine"), (1e-4, 16, 13, "cosine")]


def recover(model, train, lr, batch_size, steps, schedule):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, int(0.1 * steps), steps) if schedule == "cosine" else None
    model.train()
    for idx in mc._batch_order(len(train), batch_size, steps, torch.Generator().manual_seed(10_001)):
        x = train[idx]
        loss = model(input_ids=x, labels=x, output_router_logits=False, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
    model.eval()


def main():
    torch.set_num_threads(1)
    args = mc.parse_args(STUDY)
    out = Path(args.output_dir)
    train_lines, test_lines = read_lines(args.train_file), read_lines(args.test_file)
    tok = mc.load_tokenizer(args, train_lines, out / "base")
    train = blocks_of(tok, train_lines, args.block_size, None)
    test = blocks_of(tok, test_lines, args.block_size, args.max_test_blocks)
    base = AutoModelForCausalLM.from_pretrained(out / "base" / "seed1" / "model").eval()
    rows = [{"setting": "no fine-tune", "ppl": perplexity(base, test, 16, True)[0]}]
    for lr, bs, steps, schedule in SETTINGS:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        recover(model, train, lr, bs, steps, schedule)
        rows.append({"lr": lr, "batch_size": bs, "steps": steps, "schedule": schedule,
                     "training_blocks": bs * steps, "seconds": time.perf_counter() - t0,
                     "ppl": perplexity(model, test, 16, True)[0]})
        print(rows[-1], flush=True)
    (Path(__file__).parent / "recovery_probe.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
