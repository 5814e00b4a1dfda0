"""A small Stage 2a training run (tiny MLLM, toyshop, CPU) for `tests/test_resume.py`; not a test itself.

    python tests/_train_job.py OUT_DIR [--resume] [--max-steps N] [--sleep S]

Trains the transfer model with `tpad.stage2.train_transfer` into OUT_DIR (a checkpoint every 2 steps), then writes
OUT_DIR/final.safetensors (every trainable weight) and OUT_DIR/final.json (step, resumed_from, the logged history).
Attention dropout is switched on (`--dropout`, default 0.1), so training draws random numbers.
`--resume` continues from the newest complete checkpoint in OUT_DIR; `--sleep S` sleeps S seconds before each training
loss call, so that a test can kill the run between checkpoints.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `tpad` imports from the checkout

import torch
from safetensors.torch import save_file

from tpad import stage2
from tpad.data import load
from tpad.mllm import add_adapters, corpus_texts, load_mllm
from tpad.stage1 import tiny_mllm_config
from tpad.preprocess import preprocess

SAMPLES, BATCH = 96, 8  # 12 optimiser steps per epoch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('out_dir')
    ap.add_argument('--resume', action='store_true', help="continue from OUT_DIR's newest checkpoint")
    ap.add_argument('--max-steps', type=int, default=0, help='cap on the optimiser steps (0 = one epoch)')
    ap.add_argument('--dropout', type=float, default=0.1, help='attention dropout while training')
    ap.add_argument('--sleep', type=float, default=0.0, help='seconds to sleep before each training loss call')
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    # one thread: the tiny model gains nothing from more, and on a small shared machine torch's default threads spin
    # against other processes (8 s -> 60 s for this job when another torch process holds a core)
    torch.set_num_threads(1)
    data = load('toyshop')
    prepared = preprocess(data)
    config = stage2.tiny_stage2_config(epochs=1, max_train_samples=SAMPLES)
    mllm = tiny_mllm_config()
    config.max_val_samples = 0
    t = config.train
    t.batch_size, t.max_steps, t.save_every, t.keep_checkpoints, t.log_every = BATCH, args.max_steps, 2, 0, 1
    t.overwrite, t.resume, t.mixed_precision = not args.resume, 'latest' if args.resume else '', 'no'

    model, processor = load_mllm(mllm, texts=corpus_texts(data.items))
    model = add_adapters(model, mllm)
    # the tiny model has no dropout: switch on attention dropout so that every step draws random numbers and the
    # resumed run can only match if the checkpoint restored the RNG state too
    attention = [m for m in model.modules() if hasattr(m, 'attention_dropout')]
    assert attention, 'no attention module with attention_dropout found'
    for m in attention: m.attention_dropout = args.dropout

    if args.sleep:  # slow every step down so the test can SIGKILL the run mid-training
        call = stage2.TransferLoss.__call__
        def slow(self, model, batch):
            if model.training: time.sleep(args.sleep)
            return call(self, model, batch)
        stage2.TransferLoss.__call__ = slow

    result = stage2.train_transfer(model, processor, prepared, data.items, config, mllm, out_dir=args.out_dir)
    out = Path(args.out_dir)
    weights = {n: p.detach().to('cpu', copy=True).contiguous() for n, p in result.model.named_parameters()
               if p.requires_grad}
    save_file(weights, out / 'final.safetensors')
    (out / 'final.json').write_text(json.dumps(dict(
        step=result.step, total_steps=result.total_steps, n_trainable=len(weights),
        resumed_from=None if result.resumed_from is None else Path(result.resumed_from).name,
        checkpoint=None if result.checkpoint is None else Path(result.checkpoint).name,
        history=result.history), indent=1))
    print(f'done: step {result.step}/{result.total_steps}, resumed from {result.resumed_from}', flush=True)


if __name__ == '__main__': main()
