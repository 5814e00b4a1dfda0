"""Stage 1 of the tiny MLLM (LoRA) on the toyshop, h^K of 40 items, Stage 1 again, for `tests/test_fsdp.py`; not a test.

    python tests/_fsdp_job.py OUT_DIR [--accum K] [--resume RUN_DIR] [--stages stage1,features,again]
    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --config_file configs/accelerate/fsdp_8gpu.yaml \\
        --num_processes 2 --num_machines 1 --mixed_precision no tests/_fsdp_job.py OUT_DIR --fsdp

`--fsdp` (under the launcher): `accelerate` runs a CPU job as MULTI_CPU (DDP) even with an FSDP config, so this script
(not the library) first creates the shared accelerate state and then switches it to FSDP2, with the plugin settings
the launcher exported from the config file (FSDP_* variables) and the tiny LLaVA's decoder layer and vision layer as
the units to wrap. The `Accelerator` that `tpad.train.train` creates afterwards shares that state, so `train` runs
under FSDP2 as it would under the config on GPUs (tests/test_fsdp.py checks that it did).

Every process runs the same code:

- `--resume RUN_DIR` (first): continue the Stage 1 run in RUN_DIR from its newest checkpoint, which may have been
  written by another number of processes or without FSDP, on a freshly loaded model;
- `stage1`: `tpad.stage1.train_knowledge` (LoRA, the `knowledge` adapter) for STEPS optimiser steps of BATCH samples
  per process and `--accum` micro-batches per step into OUT_DIR/stage1 (a checkpoint every 2 steps, validation every
  2 steps in batches of 9); then OUT_DIR/gathered-<rank>.safetensors: the trainable weights of the model `train`
  returned, as this process holds them;
- `features`: `tpad.mllm.item_features` of the first N_FEATURES items with the `knowledge` adapter and with the
  `transfer` adapter (PEFT adapter switching) on the returned model, sharded over the processes, into
  OUT_DIR/features-<rank>.safetensors;
- `again`: `train_knowledge` once more on the same model object, AGAIN_STEPS steps of 2 x `--accum` micro-batches
  per process into OUT_DIR/again.

Each process writes OUT_DIR/rank-<index>.json: its index, the number of processes, the FSDP plugin settings, what
the model looked like in the loss function during training (its class, the distributed type, the FSDP units, whether
its trainable parameters were DTensors and how many of their elements this process held) and after `train` returned,
how many samples it ran through the model in each phase (while extracting: its shard), where the resumed run started
and the warnings it saw.
"""
import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `tpad` imports from the checkout

import torch
from safetensors.torch import save_file

from tpad import mllm, stage1
from tpad.data import load

BATCH, STEPS, AGAIN_STEPS, N_FEATURES = 8, 4, 2, 40
LAYERS = ['LlamaDecoderLayer', 'CLIPEncoderLayer']  # the tiny LLaVA's decoder layer and vision layer: the FSDP units


def force_fsdp2() -> dict:
    "Switch the shared accelerate state of this launched CPU process to FSDP2 (accelerate would run it as DDP)."
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    # the settings of the config file the launcher was given (it exports them as FSDP_* variables), except for the
    # layer classes to wrap: the tiny LLaVA's instead of Qwen2-VL's
    plugin = FullyShardedDataParallelPlugin(transformer_cls_names_to_wrap=LAYERS)
    acc = Accelerator()
    assert acc.num_processes > 1, 'run --fsdp under accelerate launch with ACCELERATE_USE_CPU=1 and 2 processes'
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    # every later AcceleratorState() copies the process state's distributed_type over its own: set it there too
    PartialState().distributed_type = DistributedType.FSDP
    return dict(version=plugin.fsdp_version, reshard_after_forward=plugin.reshard_after_forward,
                state_dict_type=str(plugin.state_dict_type), cpu_ram_efficient_loading=plugin.cpu_ram_efficient_loading,
                offload_params=bool(getattr(plugin.cpu_offload, 'offload_params', False)),
                wrap=list(plugin.transformer_cls_names_to_wrap or []))


def is_dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('out_dir')
    ap.add_argument('--accum', type=int, default=1, help='micro-batches per optimiser step (grad_accum_steps)')
    ap.add_argument('--stages', default='stage1,features,again', help='comma-separated: stage1, features, again')
    ap.add_argument('--resume', default='', help='first continue the Stage 1 run in this folder from its newest checkpoint')
    ap.add_argument('--fsdp', action='store_true', help='force FSDP2 (under accelerate launch on the CPU)')
    args = ap.parse_args(argv)
    stages = set(args.stages.split(',')) - {''}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)  # the same kernels in every run, and no oversubscription of a small machine
    plugin = force_fsdp2() if args.fsdp else None
    rank, world = mllm.process_layout()
    rows = dict(resume=0, stage1=0, extract=0, again=0)  # samples this process ran through the MLLM, per phase
    phase, seen_in_loss = ['resume'], {}
    last_hidden = mllm.last_hidden_states

    def counting(model, inputs):  # every forward pass of the MLLM goes through here: count this process's samples
        if phase[0] == 'extract' or model.training: rows[phase[0]] += int(inputs['input_ids'].shape[0])  # no validation
        return last_hidden(model, inputs)
    mllm.last_hidden_states = counting

    knowledge_loss = stage1.knowledge_loss

    def watching_loss(model, batch):  # what the model looks like while it trains
        if model.training and phase[0] not in seen_in_loss:
            from accelerate.state import AcceleratorState
            trainable = [p for p in model.parameters() if p.requires_grad]
            seen_in_loss[phase[0]] = dict(
                cls=type(model).__name__, distributed_type=str(AcceleratorState().distributed_type),
                fsdp_units=sorted(type(m).__name__ for m in model.modules() if type(m).__name__.startswith('FSDP')),
                trainable=len(trainable), dtensor=sum(is_dtensor(p) for p in trainable),
                local_numel=sum((p.to_local() if is_dtensor(p) else p).numel() for p in trainable),
                full_numel=sum(p.numel() for p in trainable))
        return knowledge_loss(model, batch)
    stage1.knowledge_loss = watching_loss

    data = load('toyshop')
    # LoRA, and nothing random in the forward pass
    lora = dataclasses.replace(stage1.tiny_mllm_config(), full_finetune=False, lora_dropout=0.0)

    def stage1_run(run_dir, resume: bool):
        "A freshly loaded tiny MLLM with LoRA adapters (no dropout) and the Stage 1 config of this job."
        s1 = stage1.tiny_stage1_config(epochs=1)
        t = s1.train
        t.batch_size, t.grad_accum_steps, t.max_steps, t.log_every, t.eval_every, t.save_every = BATCH, args.accum, STEPS, 1, 2, 2
        t.eval_batch_size, t.keep_checkpoints, t.mixed_precision = 9, 0, 'no'
        t.lr, t.warmup_ratio, t.overwrite, t.resume = 1e-2, 0.0, not resume, 'latest' if resume else ''
        model, processor = mllm.load_mllm(lora, texts=mllm.corpus_texts(data.items))
        torch.manual_seed(0)
        torch.rand(rank + 1)  # a different random LoRA A in every process: `train` must start them all from process 0's
        return mllm.add_adapters(model, lora), processor, s1

    resumed_from, after = None, {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        if args.resume:
            model, processor, s1 = stage1_run(Path(args.resume), resume=True)
            result = stage1.train_knowledge(model, processor, data.items, s1, lora, Path(args.resume))
            resumed_from = None if result.resumed_from is None else Path(result.resumed_from).name
            print(f'[rank {rank}/{world}] resumed {args.resume} from {resumed_from}: step {result.step}', flush=True)
        phase[0] = 'stage1'
        if stages: model, processor, s1 = stage1_run(out / 'stage1', resume=False)
        if 'stage1' in stages:
            result = stage1.train_knowledge(model, processor, data.items, s1, lora, out / 'stage1')
            m = result.model
            params = dict(m.named_parameters())
            after = dict(same_object=m is model, cls=type(m).__name__,
                         dtensor=sum(is_dtensor(p) for p in m.parameters()),
                         fsdp_modules=sum(type(x).__name__.startswith('FSDP') for x in m.modules()),
                         devices=sorted({str(p.device) for p in m.parameters()}))
            # the trainable (knowledge adapter) weights as this process holds them after `train`
            names = [n for n in params if '.lora_' in n and '.knowledge.' in n]
            save_file({n: params[n].detach().clone().contiguous() for n in names}, out / f'gathered-{rank}.safetensors')
            print(f'[rank {rank}/{world}] stage1: step {result.step}, model after train: {after}', flush=True)
        if 'features' in stages:
            phase[0] = 'extract'
            few = data.items.iloc[:N_FEATURES]
            feats = {name: mllm.item_features(model, processor, few, lora, batch_size=6, adapter=name)
                     for name in mllm.ADAPTERS}
            save_file(feats, out / f'features-{rank}.safetensors')
            print(f'[rank {rank}/{world}] features: {rows["extract"]} items read here', flush=True)
        if 'again' in stages:  # train the same model object once more: under FSDP it is sharded a second time
            phase[0] = 'again'
            # with twice the micro-batches per step: under FSDP 2 per process, accumulated without gradient sync
            again = dataclasses.replace(s1, train=dataclasses.replace(
                s1.train, max_steps=AGAIN_STEPS, grad_accum_steps=2 * args.accum))
            r = stage1.train_knowledge(model, processor, data.items, again, lora, out / 'again')
            print(f'[rank {rank}/{world}] again: step {r.step}', flush=True)
    (out / f'rank-{rank}.json').write_text(json.dumps(dict(
        rank=rank, world=world, fsdp_plugin=plugin, rows=rows, resumed_from=resumed_from, in_loss=seen_in_loss, after=after,
        warnings=[str(w.message) for w in seen]), indent=1))


if __name__ == '__main__': main()
