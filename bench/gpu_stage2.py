"""Stage 2 (Transfer-MLLM) LoRA training step on one GPU: a plain Hugging Face LoRA step against the kit's own step.

A RANDOM-WEIGHT Qwen2-VL with the exact shapes of Qwen2-VL-2B (`--shapes 2b`, the default) or a tiny one (`--shapes
tiny`, for a CPU smoke run) is built from a `Qwen2VLConfig` in code (nothing is downloaded; see bench/gpu_extract.py),
directly on the device in bfloat16 with sdpa attention, with an offline byte-level BPE tokenizer trained on the
synthetic texts and the Qwen2-VL image processor at 224 x 224 px (64 image tokens per image).

The data: synthetic items (a 224 px JPEG, a title of ~20 tokens, a category, a description) and sessions of 5 items
plus a next item. A session prompt is the kit's `session_prompt` (5 images, 5 titles; about 450 tokens with the
next item's title as the target), the next item's prompt the kit's `item_prompt`. Every run of a shape uses the same
samples in the same order (the kit's seeded epoch order, replayed by the plain loop).

Two loops, each in its own process (its own model, so that the peak memory of one says nothing of the other), each
with LoRA r = 8, alpha 16, dropout 0.05 on the language model's q/k/v/o projections, gradient checkpointing on
(non-reentrant), bf16 autocast, AdamW, gradient clipping at 1.0:
  plain  a hand-written Hugging Face + peft step: `get_peft_model`, `gradient_checkpointing_enable`, batches encoded
         beforehand into pinned CPU memory and copied non-blocking each step, `model(**batch).loss` (logits of every
         position), backward, clip, AdamW step;
  kit    `tpad.train.train` with `tpad.stage2.TransitionData` (prompts built and processed in `--workers` DataLoader
         workers during training) and `tpad.stage2.TransferLoss` on the `transfer` adapter of `tpad.mllm.add_adapters`
         (both adapters present, as in a real run).
Two variants of the step:
  gen    L_gen^T only (the kit with lambda_next = 0): the step the reference numbers were measured on;
  full   L_gen^T + InfoNCE(z_s, h^T of the next item): a second forward pass over the next items' prompts (in the plain
         loop with Hugging Face's own outputs: full logits, hidden states of every layer).
Timed: the interval between the starts of consecutive steps (torch.cuda.synchronize() at each start), after
`--warmup` steps; sessions/s = batch / median interval. Memory: torch.cuda.max_memory_allocated() over the variant
(weights included), reset before it. Reference, H100, plain Hugging Face LoRA step (gen), gradient checkpointing
on: 10.8 sessions/s at batch 8 using 12.7 GiB, 11.6 sessions/s at batch 32 using 36.6 GiB. Target: kit >= 0.9 x plain
throughput and kit memory <= plain, both measured in the same run on the same card.

usage:
  python bench/gpu_stage2.py                                   # 2b shapes, batches 8 and 32, both loops (~4 min on an H100)
  python bench/gpu_stage2.py --shapes tiny --device cpu --batches 4 --steps 2 --warmup 1   # CPU smoke run, < 1 min
Writes gpu_stage2-<shape>-<device>.json to $OUT if set, else bench/results/ (gitignored), or to --out."""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):
    if str(p) not in sys.path: sys.path.insert(0, str(p))  # run from a checkout without installing the kit
from gpu_extract import IMAGE_PX, SHAPES, TOKENIZER_VOCAB, cpu_name, qwen2vl_config, synthetic_items  # noqa: E402

REFERENCE = {8: dict(sessions_per_s=10.8, peak_gib=12.7), 32: dict(sessions_per_s=11.6, peak_gib=36.6)}  # H100, gen
SESSION_ITEMS = 5
TITLE_WORDS = 20  # one token each once the tokenizer has learnt them
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05)


def build(shape: str, n_items: int, n_samples: int, device: str, folder: Path, seed: int = 0):
    "Items, prefix samples of 5 items, tokenizer + processor, and the random-weight model of `shape` on `device`."
    import numpy as np
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil
    from tpad.mllm import Qwen2VLImageOnlyProcessor, corpus_texts, tiny_tokenizer
    from tpad.preprocess import Samples
    items = synthetic_items(n_items, folder, seed)
    words = (items['title'] + ' ' + items['text']).str.split()
    items['title'] = words.str[:TITLE_WORDS].str.join(' ').str.capitalize()
    items['text'] = words.str[TITLE_WORDS:].str.join(' ')
    tok = tiny_tokenizer('qwen2_vl', corpus_texts(items), vocab_size=TOKENIZER_VOCAB)
    ids = tok.convert_tokens_to_ids
    specials = dict(pad=tok.pad_token_id, eos=tok.eos_token_id, image=ids('<|image_pad|>'), video=ids('<|video_pad|>'),
                    start=ids('<|vision_start|>'), end=ids('<|vision_end|>'))
    s = SHAPES[shape]['vision']
    pixels = IMAGE_PX * IMAGE_PX
    processor = Qwen2VLImageOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=s['patch_size'], merge_size=s['spatial_merge_size'],
                                                 temporal_patch_size=s['temporal_patch_size'], min_pixels=pixels,
                                                 max_pixels=pixels), tokenizer=tok)
    rng = np.random.default_rng(seed)
    clicks = rng.integers(1, n_items + 1, (n_samples, SESSION_ITEMS + 1)).reshape(-1)
    starts = np.arange(n_samples) * (SESSION_ITEMS + 1)
    samples = Samples(clicks, starts, starts + SESSION_ITEMS, np.arange(n_samples))
    prepared = types.SimpleNamespace(n_items=n_items, item_ids=np.array([None, *items['item_id']], dtype=object))
    dtype = torch.bfloat16 if device.startswith('cuda') else torch.float32
    torch.manual_seed(seed)
    config = qwen2vl_config(shape, len(tok), specials)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation='sdpa')
    return items, samples, prepared, processor, model.to(device)


def stage2_config(args):
    "(the Stage 2a config, the MLLM config) of this benchmark."
    from tpad.mllm import MLLMConfig
    from tpad.stage2 import Stage2Config
    mllm = MLLMConfig(max_session_items=SESSION_ITEMS, max_text_tokens=32, image_size=IMAGE_PX, lora_r=LORA["r"],
                      lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"])
    return Stage2Config(lambda_next=1.0, temperature=0.1, max_train_samples=0, max_val_samples=0,
                        max_target_tokens=32), mllm


class StepClock:
    "Wraps a loss function: synchronises the device and notes the time at the start of every step."
    def __init__(self, fn, sync):
        self.fn, self.sync, self.marks = fn, sync, []

    def __call__(self, model, batch):
        self.sync()
        self.marks.append(time.perf_counter())
        return self.fn(model, batch)

    def intervals(self, warmup: int) -> list:
        return [b - a for a, b in zip(self.marks[warmup:], self.marks[warmup + 1:])]


def worker(args) -> dict:
    "One loop (`args.loop`: plain or kit) over every batch size and variant, in this process."
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tpad.train import TrainConfig, EpochSampler, train
    from tpad.stage2 import TransferLoss, TransitionData
    device = args.device
    cuda = device.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = args.warmup + args.steps + 1
    n_samples = max(args.batches) * steps
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='tpad-gpu-stage2-') as tmp:
        items, samples, prepared, processor, model = build(args.shapes, args.items, n_samples, device, Path(tmp))
        config, mllm = stage2_config(args)
        data = TransitionData(samples, prepared, items, processor, config, mllm)
        built_s = time.perf_counter() - t0
        rows = []
        if args.loop == 'kit':
            from tpad.mllm import add_adapters, use_adapter
            model = add_adapters(model, mllm)
        else:
            from peft import LoraConfig, get_peft_model
            from tpad.mllm import LANGUAGE_ATTENTION
            model = get_peft_model(model, LoraConfig(target_modules=LANGUAGE_ATTENTION, bias='none', **LORA))
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
            model.train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for batch_size in args.batches:
            order = list(EpochSampler(len(data), 0, True))  # the kit's epoch-0 order, replayed by the plain loop
            encoded = None
            if args.loop == 'plain':  # encoded beforehand (not timed), pinned, copied non-blocking in the step
                def to_pinned(b):
                    out = {}
                    for k, v in b.items():
                        if k == 'pixel_values' and cuda: v = v.to(torch.bfloat16)
                        out[k] = v.pin_memory() if cuda else v
                    return out
                encoded = []
                for s in range(steps):
                    b = data.collate([data[i] for i in order[s * batch_size:(s + 1) * batch_size]])
                    encoded.append(dict(session=to_pinned(b['session']), item=to_pinned(b['item']),
                                        target=b['target']))
            for variant in args.variants:
                if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
                row = dict(loop=args.loop, batch=batch_size, variant=variant)
                try:
                    if args.loop == 'kit':
                        cfg = dataclasses.replace(config, lambda_next=1.0 if variant == 'full' else 0.0)
                        clock = StepClock(TransferLoss(cfg, mllm), sync)
                        tc = TrainConfig(lr=1e-4, batch_size=batch_size, epochs=1, max_steps=steps, warmup_steps=0,
                                         schedule='constant', max_grad_norm=1.0, gradient_checkpointing=True,
                                         mixed_precision='bf16' if cuda else 'no', num_workers=args.workers,
                                         log_every=1, seed=0)
                        with use_adapter(model, 'transfer'):
                            result = train(model, data, data.collate, clock, tc, out_dir='', progress=False)
                        model = result.model
                        losses = [r['loss'] for r in result.history]
                    else:
                        clock = StepClock(lambda m, b: None, sync)
                        params = [p for p in model.parameters() if p.requires_grad]
                        opt = torch.optim.AdamW(params, lr=1e-4)
                        losses = []
                        for b in encoded:
                            clock(model, b)
                            s = {k: v.to(device, non_blocking=True) for k, v in b['session'].items()}
                            with torch.autocast(device.split(':')[0], dtype=torch.bfloat16, enabled=cuda):
                                out = model(**s, output_hidden_states=variant == 'full')
                                loss = out.loss
                                if variant == 'full':
                                    it = {k: v.to(device, non_blocking=True) for k, v in b['item'].items()
                                          if k != 'labels'}
                                    last = lambda mask: mask.sum(1) - 1  # right padding: the last real token
                                    rows_ = torch.arange(len(b['target']), device=device)
                                    z = out.hidden_states[-1][rows_, last(s['attention_mask'] * (s['labels'] == -100))]
                                    h = model(**it, output_hidden_states=True).hidden_states[-1][rows_, last(it['attention_mask'])]
                                    sim = F.normalize(z.float(), dim=-1) @ F.normalize(h.float(), dim=-1).T / 0.1
                                    loss = loss + F.cross_entropy(sim, rows_)
                            loss.backward()
                            torch.nn.utils.clip_grad_norm_(params, 1.0)
                            opt.step()
                            opt.zero_grad(set_to_none=True)
                            losses.append(float(loss.detach()))
                        del opt
                    sync()
                    times = clock.intervals(args.warmup)
                    row.update(steps_timed=len(times), step_s_median=statistics.median(times),
                               sessions_per_s=batch_size / statistics.median(times),
                               sessions_per_s_mean=batch_size * len(times) / sum(times),
                               peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                               losses=[round(x, 4) for x in losses])
                except torch.OutOfMemoryError as e:
                    row['error'] = f'out of memory: {str(e)[:200]}'
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != 'losses'}), flush=True)
        s = data.collate([data[i] for i in range(min(8, len(data)))])['session']
        seq = dict(mean=float(s['attention_mask'].sum(1).float().mean()), target_tokens=float((s['labels'] != -100).sum(1).float().mean()))
    return dict(loop=args.loop, shape=args.shapes, device=device, built_s=built_s, trainable=trainable,
                session_tokens=seq, rows=rows)


def table(result: dict) -> str:
    "Markdown table: per batch and variant, plain vs kit throughput and peak memory, and their ratios."
    by = {(r['loop'], r['batch'], r['variant']): r for r in result['rows']}
    lines = ['| shape | batch | step | plain sess/s | kit sess/s | kit / plain | plain GiB | kit GiB | kit / plain |',
             '|---|---|---|---|---|---|---|---|---|']
    for b in result['batches']:
        for v in result['variants']:
            p, k = by.get(('plain', b, v), {}), by.get(('kit', b, v), {})
            f = lambda r, key, fmt: format(r[key], fmt) if r.get(key) is not None else r.get('error', 'n/a')[:20]
            ratio = lambda key: (f"{k[key] / p[key]:.2f}" if k.get(key) and p.get(key) else 'n/a')
            lines.append(f"| {result['shape']} | {b} | {v} | {f(p, 'sessions_per_s', '.2f')} | {f(k, 'sessions_per_s', '.2f')} "
                         f"| {ratio('sessions_per_s')} | {f(p, 'peak_gib', '.1f')} | {f(k, 'peak_gib', '.1f')} | {ratio('peak_gib')} |")
    return '\n'.join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--shapes', default='2b', choices=['2b', 'tiny'], help='model shapes (default: 2b)')
    p.add_argument('--device', default=None, help="'cuda', 'cuda:N' or 'cpu' (default: cuda when available)")
    p.add_argument('--batches', type=int, nargs='+', default=[8, 32], help='batch sizes (sessions per step)')
    p.add_argument('--variants', nargs='+', default=['gen', 'full'], choices=['gen', 'full'])
    p.add_argument('--steps', type=int, default=6, help='timed steps per variant')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps before them')
    p.add_argument('--items', type=int, default=600, help='items in the synthetic catalogue')
    p.add_argument('--workers', type=int, default=None, help='DataLoader workers of the kit (default: min(8, cores - 2) on CUDA, 0 on CPU)')
    p.add_argument('--loops', nargs='+', default=['plain', 'kit'], choices=['plain', 'kit'])
    p.add_argument('--out', type=Path, default=None, help='folder for the JSON (default: $OUT, else bench/results)')
    p.add_argument('--loop', default=None, help=argparse.SUPPRESS)  # internal: run one loop in this process
    args = p.parse_args(argv)
    import torch
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args.shapes != 'tiny' and not args.device.startswith('cuda'):
        p.error('only --shapes tiny runs on a CPU')
    if args.workers is None: args.workers = max(0, min(8, (os.cpu_count() or 1) - 2)) if args.device.startswith('cuda') else 0
    if args.loop:  # a worker process: one loop, result as the last line of stdout
        print('RESULT ' + json.dumps(worker(args)), flush=True)
        return {}
    env = dict(os.environ, TOKENIZERS_PARALLELISM='false', PYTHONUNBUFFERED='1')
    result = dict(shape=args.shapes, device=args.device, batches=args.batches, variants=args.variants,
                  device_name=torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else cpu_name(),
                  torch=torch.__version__, workers=args.workers, reference_h100_gen=REFERENCE, rows=[], loops={})
    import transformers, peft
    result.update(transformers=transformers.__version__, peft=peft.__version__)
    print(f"{result['device_name']} | torch {torch.__version__} | transformers {transformers.__version__} | peft {peft.__version__}", flush=True)
    for loop in args.loops:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, '--loop', loop, '--shapes', args.shapes, '--device', args.device,
               '--batches', *map(str, args.batches), '--variants', *args.variants, '--steps', str(args.steps),
               '--warmup', str(args.warmup), '--items', str(args.items), '--workers', str(args.workers)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines = r.stdout.splitlines()
        for line in lines:
            if not line.startswith('RESULT '): print(f'  [{loop}] {line}', flush=True)
        done = [json.loads(l[7:]) for l in lines if l.startswith('RESULT ')]
        if r.returncode or not done:
            result['loops'][loop] = dict(error=f'exit {r.returncode}', tail=lines[-20:])
            continue
        result['rows'] += done[0].pop('rows')
        result['loops'][loop] = dict(done[0], seconds=time.perf_counter() - t0)
    out = args.out or Path(os.environ.get('OUT') or ROOT / 'bench' / 'results')
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_stage2-{args.shapes}-{args.device.replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(table(result))
    for loop, info in result['loops'].items():
        if 'error' in info: print(f'{loop}: FAILED ({info["error"]})')
        else: print(f"{loop}: built in {info['built_s']:.0f} s, {info['seconds']:.0f} s in all, {info['trainable']:,} trainable, "
                    f"session prompt {info['session_tokens']['mean']:.0f} tokens ({info['session_tokens']['target_tokens']:.0f} target)")
    print(f'wrote {path}')
    return result


if __name__ == '__main__':
    r = main()
    sys.exit(1 if any('error' in info for info in r.get('loops', {}).values()) else 0)
