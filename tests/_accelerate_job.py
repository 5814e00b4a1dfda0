"""Stage 1, h^K extraction, Stage 2a and Stage 2b of the tiny MLLM on the toyshop, for `tests/test_accelerate.py`; not a test.

    python tests/_accelerate_job.py OUT_DIR [--accum K] [--stages stage1,features,stage2,stage2b] [--resume RUN_DIR]
    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... \\
        tests/_accelerate_job.py OUT_DIR

Every process runs the same code, as a user's script would under `accelerate launch`:

- `--resume RUN_DIR` (first): continue the Stage 1 run in RUN_DIR from its newest checkpoint, which may have been
  written by another number of processes, on a freshly loaded model;
- `stage1`: `tpad.stage1.train_knowledge` for STAGE1_STEPS optimiser steps of BATCH samples per process and `--accum`
  micro-batches per step, into OUT_DIR/stage1 (a checkpoint every 2 steps, validation every 2 steps in batches of 9,
  so that two processes get unequal shares of the 60 held-out items);
- `features`: `tpad.stage1.knowledge_features` into the cache OUT_DIR/cache/h_K.safetensors;
- `stage2`: `tpad.stage2.train_transfer` on the same model for STAGE2_STEPS steps into OUT_DIR/stage2;
- `stage2b`: `tpad.align.stage2b` on the same model and the first ALIGN_ITEMS items (h^K from `features`, h^T
  extracted with the `transfer` adapter) for ALIGN_STEPS steps into OUT_DIR/stage2b, its caches (h^T, the distilled
  h^K, e^LLM) in OUT_DIR/cache2b; needs `features` and `stage2`.

Each process writes OUT_DIR/rank-<index>.json: its index, the number of processes, how many samples it ran through
the model in each phase (while extracting: its shard), whether the model was sharded (FSDP) while it trained, where the resumed run started, the warnings it saw and, after
Stage 2b, its before/after numbers and a hash of its CLUB network q (which DDP does not synchronise).
"""
import argparse
import dataclasses
import hashlib
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `tpad` imports from the checkout

import torch

from tpad import align, mllm, stage1, stage2
from tpad.data import load
from tpad.preprocess import preprocess

BATCH, STAGE1_STEPS, STAGE2_STEPS, ALIGN_STEPS, ALIGN_ITEMS = 8, 4, 3, 3, 64


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('out_dir')
    ap.add_argument('--accum', type=int, default=1, help='micro-batches per optimiser step (grad_accum_steps)')
    ap.add_argument('--stages', default='stage1,features,stage2,stage2b',
                    help='comma-separated: stage1, features, stage2, stage2b')
    ap.add_argument('--resume', default='', help='first continue the Stage 1 run in this folder from its newest checkpoint')
    ap.add_argument('--fsdp', action='store_true', help='force FSDP2 (under accelerate launch on the CPU; see _fsdp_job.py)')
    args = ap.parse_args(argv)
    if args.fsdp:
        from _fsdp_job import force_fsdp2  # (tests/ is on the path: it is this script's folder)
        force_fsdp2()
    stages = set(args.stages.split(',')) - {''}
    out = Path(args.out_dir)

    torch.set_num_threads(1)  # the same kernels in every run, and no oversubscription of a small machine
    rank, world = mllm.process_layout()
    rows = dict(resume=0, stage1=0, extract=0, stage2=0, stage2b=0)  # samples this process ran through the MLLM, per phase
    phase = ['resume']
    last_hidden = mllm.last_hidden_states

    sharded = {}  # per training phase: whether the MLLM's weights were FSDP's DTensors (sharded) while it trained

    def counting(model, inputs):  # every forward pass of the MLLM goes through here: count this process's samples
        if phase[0] == 'extract' or model.training: rows[phase[0]] += int(inputs['input_ids'].shape[0])  # no validation
        if model.training: sharded[phase[0]] = any(type(p).__name__ == 'DTensor' for p in model.parameters())
        return last_hidden(model, inputs)
    mllm.last_hidden_states = align.last_hidden_states = counting  # align holds its own reference to it

    data, tiny = load('toyshop'), stage1.tiny_mllm_config()

    def stage1_run(run_dir, resume: bool):
        "A freshly loaded tiny MLLM and the Stage 1 config of this job (its run folder is `run_dir`)."
        s1 = stage1.tiny_stage1_config(epochs=1)
        t = s1.train
        t.batch_size, t.grad_accum_steps, t.max_steps, t.log_every, t.eval_every, t.save_every = BATCH, args.accum, STAGE1_STEPS, 1, 2, 2
        t.eval_batch_size, t.keep_checkpoints, t.mixed_precision = 9, 0, 'no'
        t.overwrite, t.resume = not resume, 'latest' if resume else ''
        model, processor = mllm.load_mllm(tiny, texts=mllm.corpus_texts(data.items))
        return mllm.add_adapters(model, tiny), processor, s1

    resumed_from = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        if args.resume:
            model, processor, s1 = stage1_run(Path(args.resume), resume=True)
            result = stage1.train_knowledge(model, processor, data.items, s1, tiny, Path(args.resume))
            resumed_from = None if result.resumed_from is None else Path(result.resumed_from).name
            print(f'[rank {rank}/{world}] resumed {args.resume} from {resumed_from}: step {result.step}', flush=True)
        phase[0] = 'stage1'
        if stages: model, processor, s1 = stage1_run(out / 'stage1', resume=False)
        if 'stage1' in stages:
            result = stage1.train_knowledge(model, processor, data.items, s1, tiny, out / 'stage1')
            print(f'[rank {rank}/{world}] stage1: step {result.step}, resumed from {result.resumed_from}', flush=True)
        if 'features' in stages:
            phase[0] = 'extract'
            h_K = stage1.knowledge_features(model, processor, data.items, tiny, out / 'cache', batch_size=s1.extract_batch_size)
            print(f'[rank {rank}/{world}] features: {tuple(h_K.shape)}, {rows["extract"]} items read here', flush=True)
        if 'stage2' in stages:
            phase[0] = 'stage2'
            s2 = stage2.tiny_stage2_config(epochs=1, max_train_samples=64)
            s2.max_val_samples = 16
            t2 = s2.train
            t2.batch_size, t2.grad_accum_steps, t2.max_steps, t2.log_every, t2.eval_every = BATCH, args.accum, STAGE2_STEPS, 1, STAGE2_STEPS
            t2.save_every, t2.mixed_precision = STAGE2_STEPS, 'no'
            r2 = stage2.train_transfer(model, processor, preprocess(data), data.items, s2, tiny, out / 'stage2')
            print(f'[rank {rank}/{world}] stage2: step {r2.step}', flush=True)
        stage2b = {}
        if 'stage2b' in stages:
            phase[0] = 'stage2b'
            few = data.items.iloc[:ALIGN_ITEMS]
            h_T = stage2.transfer_features(model, processor, few, tiny, out / 'cache2b', batch_size=s2.extract_batch_size)
            a = align.tiny_align_config(epochs=1)
            ta = a.train
            ta.batch_size, ta.grad_accum_steps, ta.max_steps, ta.log_every, ta.save_every = BATCH, args.accum, ALIGN_STEPS, 1, ALIGN_STEPS
            ta.mixed_precision = 'no'
            r3 = align.stage2b(model, processor, few, h_K[:ALIGN_ITEMS], h_T, a, s1, tiny, out / 'stage2b', out / 'cache2b')
            q = b''.join(p.detach().numpy().tobytes() for p in r3.aligner.club.parameters())
            stage2b = dict(before=r3.before, after=r3.after, q=hashlib.sha256(q).hexdigest(), steps=r3.train.step)
            print(f'[rank {rank}/{world}] stage2b: step {r3.train.step}', flush=True)
    (out / f'rank-{rank}.json').write_text(json.dumps(dict(
        rank=rank, world=world, rows=rows, sharded=sharded, resumed_from=resumed_from, stage2b=stage2b,
        warnings=[str(w.message) for w in seen]), indent=1))


if __name__ == '__main__': main()
