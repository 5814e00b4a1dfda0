"""The one GPU check of the kit at real model shapes: Stage 1 and Stage 2a training and item-feature extraction.

In one run (under 8 minutes on an H100 by the estimate below), for each model: Stage 1 training steps, Stage 2a
training steps and item-feature extraction, all through the kit's own code, with throughput, peak GPU memory and a
loss that must decrease over a few dozen steps on a toy batch; then one table, a JSON and the table as markdown.

Models: RANDOM weights (nothing is downloaded), built from a config in code directly on the device in bfloat16 with
sdpa attention (`_from_config` under `torch.device('cuda')`: a 7B model never materialises on the CPU), then handed
to the kit's functions as objects (`train_knowledge`, `train_transfer` and `item_features` take the model; nothing is
saved and loaded: writing 14 GB would eat a third of the budget).
  qwen2vl-2b  Qwen2-VL-2B: `gpu_extract.SHAPES['2b']` (Qwen/Qwen2-VL-2B-Instruct config.json); 2,208,985,600
              weights; the Qwen2-VL image processor at 224 x 224 px -> 64 image tokens per image.
  llava-7b    LLaVA-1.5-7B: the shapes of llava-hf/llava-1.5-7b-hf's config.json. transformers' `LlavaConfig()`
              defaults (CLIPVisionConfig / LlamaConfig, checked in transformers 5.24) are the same model except three
              text fields the released config sets: vocab_size 32064 (default 32000), max_position_embeddings 4096
              (2048), rms_norm_eps 1e-5 (1e-6). Vision: CLIP ViT-L/14 at 336 px (24 layers, hidden 1024, MLP 4096, 16
              heads, patch 14, quick_gelu), features of layer -2 without CLS ('default'); projector mlp2x_gelu (Linear
              1024 -> 4096, GELU, Linear 4096 -> 4096); text: Llama-2-7B (Vicuna-7B-v1.5: 32 layers, hidden 4096,
              MLP 11008, 32 heads, 32 KV heads, vocab 32064, 4096 positions), untied LM head. 7,063,427,072 weights
              (vision 303,507,456, projector 20,979,712, language 6,738,939,904 = Llama-2-7B's 6,738,415,616 + 64
              more rows in embeddings and LM head). The processor is the one the kit builds for its tiny LLaVA
              (`LlavaProcessor` + `CLIPImageProcessorPil`, no torchvision) at 336 px -> 576 image tokens per image.
  qwen2vl-tiny, llava-tiny  the same two families at toy sizes, for a CPU smoke run (`--shapes tiny`).
Token ids: an offline byte-level BPE tokenizer (`tpad.mllm.tiny_tokenizer`, 4000 tokens trained on the synthetic
texts) stands in for the real one, so special tokens have its ids (LLaVA's <image> is 3, not 32000; pad 0, not
32001); every weight shape, the embedding and LM head included, is the real model's.

Data: `gpu_extract.synthetic_items` (a 224 px JPEG, a title of 20 words, a category, a description of 16-32 words;
one token per word once the tokenizer has learnt them). Both adapters of `tpad.mllm.add_adapters` (LoRA r = 8,
alpha 16, dropout 0.05 on the language model's q/k/v/o). Training: `tpad.train.train` through the stage functions,
gradient checkpointing on (non-reentrant), bf16 autocast, AdamW at a constant lr of 1e-3 (high for LoRA, so that a
random-weight model visibly overfits in a few dozen steps), gradient clipping at 1.0, `--workers` DataLoader workers.
The toy batch: the first `batch` rows, repeated once per step in order (shuffle off), so every step sees it.
  stage1   `tpad.stage1.train_knowledge` (holdout 0): item prompt (image, title, category, instruction) -> the
           category and description as target (<= 48 tokens); the `knowledge` adapter. 30 steps.
  stage2   `tpad.stage2.train_transfer` on a stand-in `Prepared` (the toy sessions as its train split): 5-item
           session prompt (5 images, 5 titles) -> the next item's title, plus InfoNCE against the next items'
           prompts (lambda_next 1: a second forward pass); the `transfer` adapter. 10 steps.
  extract  `tpad.mllm.item_features` over N items with the `knowledge` adapter (length buckets, DataLoader workers,
           pinned transfers): items/s after a warm-up call on one batch.
Measured per phase: the step time (median interval between the starts of consecutive steps, taken by a forward
pre-hook that synchronises the device; the first 2 intervals are warm-up) -> samples/s and tokens/s; peak GPU memory
(`torch.cuda.max_memory_allocated`, reset before the phase, weights included); the loss of every step. Checked: the
mean loss of the last 5 steps is below that of the first 5 (Stage 1 and 2a), features finite, every phase present.
The exit status is 1 when a check fails or a model ran out of time (the JSON and the table are written anyway).

Budget (H100 estimate, seconds; `--plan` prints it; the 2B step times scale the kit's Stage 2 'full' step measured by
bench/gpu_stage2.py on an H200 (1.63 s at batch 8, 580 tokens a sample) by tokens and images, with 20 % for the
H100; the 7B step times assume ~3000 trained tokens/s (6 x 6.6e9 FLOP a token with checkpointing and a frozen base:
~12 % of the H100's bf16 peak), its extraction ~30 items/s (2 x 6.6e9 FLOP a token x 610 tokens: ~25 % of peak;
gpu_extract's reference, 159 items/s for the 7B Qwen2-VL shapes, is ~30 %). Tokens a row as the tiny run measures
them (the same tokenizer and prompts), with LLaVA's 16 tiny image tokens replaced by 576:
                 start  build  stage1 (batch x steps)     stage2 (batch x steps)      extract (items, batch)   total
  qwen2vl-2b       20     10    8 + 30 x 0.8  (16 x 133)   8 + 10 x 2.0  (8 x 592)    8 + 1024 / 200  (128)     103
  llava-7b         20     15   10 + 30 x 1.75 ( 8 x 644)  10 + 10 x 5.0  (4 x 3654)  10 +  512 / 30   ( 32)     185
                                                                                                   both models   288
(tokens a row: image tokens + prompt + target; Stage 2: session prompt + the next item's prompt.) About 5 minutes.
`--budget` (default 450 s, 7.5 minutes) bounds the run: when the plan exceeds it, steps and items are scaled down
together (at least 10 Stage 1 steps, 4 Stage 2 steps, 2 extraction batches); each model runs in its own process
under a time limit, its share of what is left of the budget in proportion to its estimate, so one slow model cannot
eat the other's time; a model that finds itself slower than planned cuts its later phases to fit its limit (noted in
the JSON), and a model that runs out anyway keeps the phases it finished. On the device tool: timeout_s 540.
Memory (bf16 weights + checkpointed layer inputs 2 x L x h bytes a token + one layer's recompute ~213 KB a token
for 7B + LoRA and AdamW state ~0.2 GB): 7B stage1 batch 8 ~18 GB, stage2 batch 4 ~22 GB, extraction batch 32 ~21 GB
(every layer's hidden states are returned: 33 x 610 x 4096 x 2 bytes an item); 2B stage1 batch 16 ~8 GB, stage2
batch 8 ~6 GB (measured by gpu_stage2 on an H200), extraction batch 128 < 10 GB. All below 80 GB by a factor of 3 or
more: the batch sizes are set by the time budget, not by memory.

usage:
  python bench/gpu_check.py                                   # CUDA: qwen2vl-2b then llava-7b (~5 min on an H100)
  python bench/gpu_check.py --budget 240                      # the same with steps and items scaled to 4 minutes
  python bench/gpu_check.py --plan [--budget S]               # the plan and its time estimate only, nothing built
  python bench/gpu_check.py --shapes tiny --device cpu        # CPU smoke run of the tiny shapes, < 1 min
Writes gpu_check-<device>-<time>.json and .md to $OUT if set, else bench/results/ (gitignored), or to --out."""
import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):
    if str(p) not in sys.path: sys.path.insert(0, str(p))  # run from a checkout without installing the kit
from gpu_extract import SHAPES, TOKENIZER_VOCAB, cpu_name, pick_workers, qwen2vl_config, synthetic_items  # noqa: E402
from gpu_stage2 import SESSION_ITEMS, TITLE_WORDS  # noqa: E402

# LLaVA-1.5 shapes (llava-hf/llava-1.5-7b-hf config.json; see the docstring) and a tiny LLaVA of the same make.
LLAVA_SHAPES = {
    '7b': dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         hidden_act='silu'),
               vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768, hidden_act='quick_gelu',
                           layer_norm_eps=1e-5),
               projector_hidden_act='gelu', vision_feature_layer=-2, vision_feature_select_strategy='default'),
    'tiny': dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=4096, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           hidden_act='silu'),
                 vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             image_size=56, patch_size=14, projection_dim=64, hidden_act='quick_gelu',
                             layer_norm_eps=1e-5),
                 projector_hidden_act='gelu', vision_feature_layer=-2, vision_feature_select_strategy='default'),
}

# Per model: family, shape, image side, weights (asserted on the built model), phase sizes, and the time estimate:
# start (interpreter, imports, CUDA context), build, and per phase (fixed seconds, seconds per step or per item).
# GPU models: H100 seconds (see the docstring); tiny models: seconds on a 2-core CPU.
MODELS = {
    'qwen2vl-2b': dict(family='qwen2_vl', shape='2b', image_px=224, parameters=2_208_985_600, gpu=True,
                       stage1=dict(batch=16, steps=30), stage2=dict(batch=8, steps=10),
                       extract=dict(batch=128, items=1024),
                       est=dict(start=20, build=10, stage1=(8, 0.8), stage2=(8, 2.0), extract=(8, 1 / 200))),
    'llava-7b': dict(family='llava', shape='7b', image_px=336, parameters=7_063_427_072, gpu=True,
                     stage1=dict(batch=8, steps=30), stage2=dict(batch=4, steps=10), extract=dict(batch=32, items=512),
                     est=dict(start=20, build=15, stage1=(10, 1.75), stage2=(10, 5.0), extract=(10, 1 / 30))),
    'qwen2vl-tiny': dict(family='qwen2_vl', shape='tiny', image_px=224, parameters=1_585_664, gpu=False,
                         stage1=dict(batch=4, steps=30), stage2=dict(batch=4, steps=10), extract=dict(batch=8, items=32),
                         est=dict(start=10, build=2, stage1=(2, 0.25), stage2=(2, 1.0), extract=(1, 0.03))),
    'llava-tiny': dict(family='llava', shape='tiny', image_px=56, parameters=1_507_712, gpu=False,
                       stage1=dict(batch=4, steps=30), stage2=dict(batch=4, steps=10), extract=dict(batch=8, items=32),
                       est=dict(start=10, build=2, stage1=(2, 0.12), stage2=(2, 0.35), extract=(1, 0.01))),
}
GROUPS = {'gpu': ['qwen2vl-2b', 'llava-7b'], 'tiny': ['qwen2vl-tiny', 'llava-tiny']}
PHASES = ('stage1', 'stage2', 'extract')
MIN_STEPS = dict(stage1=10, stage2=4)
LR = 1e-3
WARMUP_INTERVALS = 2  # step intervals left out of the timing
DEFAULT_BUDGET = 450


# --- plan ---------------------------------------------------------------------------------------------------------
def phase_seconds(key: str, phase: str, n: int) -> float:
    "Estimated seconds of `phase` of model `key` with `n` steps (training) or items (extraction)."
    fixed, per = MODELS[key]['est'][phase]
    return fixed + n * per


def model_seconds(key: str, sizes: dict) -> float:
    "Estimated seconds of one model's whole run (start, build, every phase) at `sizes` (phase -> steps / items)."
    e = MODELS[key]['est']
    return e['start'] + e['build'] + sum(phase_seconds(key, ph, sizes[ph]) for ph in PHASES)


def _floor(phase: str, key: str) -> int:
    return MIN_STEPS.get(phase) or 2 * MODELS[key]['extract']['batch']


def _size(key: str, phase: str) -> int:
    s = MODELS[key][phase]
    return s['items'] if phase == 'extract' else s['steps']


def plan(keys: list, budget: float, overrides: dict | None = None) -> dict:
    "Steps and items per model so that the estimated run fits `budget` seconds; `overrides` (phase -> n) are kept as given."
    overrides = {ph: n for ph, n in (overrides or {}).items() if n}
    full = {k: {ph: overrides.get(ph, _size(k, ph)) for ph in PHASES} for k in keys}
    scaled = [ph for ph in PHASES if ph not in overrides]  # what the budget may scale down
    var = sum(MODELS[k]['est'][ph][1] * full[k][ph] for k in keys for ph in scaled)
    fixed = sum(model_seconds(k, full[k]) for k in keys) - var
    scale = 1.0 if fixed + var <= budget or var == 0 else max(0.0, (budget - fixed) / var)
    models = {}
    for k in keys:
        sizes = {ph: full[k][ph] if ph not in scaled or scale == 1.0 else max(_floor(ph, k), int(full[k][ph] * scale))
                 for ph in PHASES}
        models[k] = dict(sizes=sizes, full=full[k], est_s=model_seconds(k, sizes),
                         est_phase_s={ph: phase_seconds(k, ph, sizes[ph]) for ph in PHASES})
    total = sum(m['est_s'] for m in models.values())
    return dict(budget_s=budget, scale=scale, est_total_s=total, fits=total <= budget, models=models)


def plan_table(p: dict) -> str:
    lines = [f"| model | stage1 steps | stage2 steps | extract items | est. stage1 s | est. stage2 s | est. extract s "
             f"| est. total s |", '|---|---|---|---|---|---|---|---|']
    for k, m in p['models'].items():
        s, e = m['sizes'], m['est_phase_s']
        lines.append(f"| {k} | {s['stage1']} | {s['stage2']} | {s['extract']} | {e['stage1']:.0f} | {e['stage2']:.0f} "
                     f"| {e['extract']:.0f} | {m['est_s']:.0f} |")
    note = '' if p['scale'] == 1.0 else f", steps and items scaled by {p['scale']:.2f}"
    lines.append(f"\nestimated {p['est_total_s']:.0f} s of a {p['budget_s']:.0f} s budget{note}"
                 f"{'' if p['fits'] else ' (does not fit even at the minimum steps)'}")
    return '\n'.join(lines)


# --- models -------------------------------------------------------------------------------------------------------
def llava_config(shape: str, tok):
    "The `LlavaConfig` of LLaVA-1.5 `shape`, with the special-token ids of the tokenizer `tok`."
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    s = LLAVA_SHAPES[shape]
    if len(tok) > s['text']['vocab_size']: raise ValueError(f"tokenizer has {len(tok)} tokens > vocab {s['text']['vocab_size']}")
    v = s['vision']
    text = LlamaConfig(**s['text'], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=text,
                       image_token_id=tok.convert_tokens_to_ids('<image>'), pad_token_id=tok.pad_token_id,
                       projector_hidden_act=s['projector_hidden_act'], vision_feature_layer=s['vision_feature_layer'],
                       vision_feature_select_strategy=s['vision_feature_select_strategy'],
                       image_seq_length=(v['image_size'] // v['patch_size']) ** 2, tie_word_embeddings=False)


def model_config(key: str, tok):
    "The transformers config of model `key` for tokenizer `tok`."
    spec = MODELS[key]
    if spec['family'] == 'llava': return llava_config(spec['shape'], tok)
    ids = tok.convert_tokens_to_ids
    return qwen2vl_config(spec['shape'], len(tok), dict(pad=tok.pad_token_id, eos=tok.eos_token_id,
                                                        image=ids('<|image_pad|>'), video=ids('<|video_pad|>'),
                                                        start=ids('<|vision_start|>'), end=ids('<|vision_end|>')))


def model_class(key: str):
    from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration
    return LlavaForConditionalGeneration if MODELS[key]['family'] == 'llava' else Qwen2VLForConditionalGeneration


def parameter_count(key: str) -> int:
    "Weights of model `key`, counted on the meta device (nothing allocated)."
    import torch
    from tpad.mllm import tiny_tokenizer
    tok = tiny_tokenizer(MODELS[key]['family'])  # bytes only: the ids of the special tokens are all that matter
    with torch.device('meta'): m = model_class(key)(model_config(key, tok))
    return sum(p.numel() for p in m.parameters())


def processor_for(key: str, tok):
    "The processor the kit uses for the family of `key`, at the model's image side."
    spec = MODELS[key]
    px = spec['image_px']
    if spec['family'] == 'llava':  # as tpad.mllm builds its tiny LLaVA: CLIP preprocessing without torchvision
        from transformers import CLIPImageProcessorPil, LlavaProcessor
        v = LLAVA_SHAPES[spec['shape']]['vision']
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(size={'shortest_edge': px},
                                                                    crop_size={'height': px, 'width': px}),
                              tokenizer=tok, patch_size=v['patch_size'], num_additional_image_tokens=1,
                              vision_feature_select_strategy=LLAVA_SHAPES[spec['shape']]['vision_feature_select_strategy'])
    from transformers import Qwen2VLImageProcessorPil
    from tpad.mllm import Qwen2VLImageOnlyProcessor
    v = SHAPES[spec['shape']]['vision']
    return Qwen2VLImageOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=v['patch_size'], merge_size=v['spatial_merge_size'],
                                                 temporal_patch_size=v['temporal_patch_size'], min_pixels=px * px,
                                                 max_pixels=px * px), tokenizer=tok)


def build(key: str, n_items: int, folder: Path, device: str, dtype):
    "Synthetic items, tokenizer + processor, and the random-weight model of `key` built on `device` in `dtype`."
    import torch
    from tpad.mllm import corpus_texts, tiny_tokenizer
    items = synthetic_items(n_items, folder / 'images')
    words = (items['title'] + ' ' + items['text']).str.split()  # as gpu_stage2: a 20-word title, the rest as text
    items['title'] = words.str[:TITLE_WORDS].str.join(' ').str.capitalize()
    items['text'] = words.str[TITLE_WORDS:].str.join(' ')
    tok = tiny_tokenizer(MODELS[key]['family'], corpus_texts(items), vocab_size=TOKENIZER_VOCAB)
    processor = processor_for(key, tok)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(key)._from_config(model_config(key, tok), dtype=dtype, attn_implementation='sdpa')
    model.to(device)  # a no-op when the weights were created there
    n = sum(p.numel() for p in model.parameters())
    if n != MODELS[key]['parameters']: raise AssertionError(f"{key}: built {n:,} weights, expected {MODELS[key]['parameters']:,}")
    return items, processor, model


# --- phases -------------------------------------------------------------------------------------------------------
class ForwardClock:
    "Notes the time at every forward call of `model` (after a device sync): with `calls` forwards a step, the step starts."
    def __init__(self, model, sync, calls: int = 1):
        self.model, self.sync, self.calls, self.marks = model, sync, calls, []

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc): self.handle.remove()

    def _hook(self, module, args):
        self.sync()
        self.marks.append(time.perf_counter())

    def step_intervals(self) -> list:
        starts = self.marks[::self.calls]
        return [b - a for a, b in zip(starts, starts[1:])]


def train_config(batch: int, steps: int, workers: int, cuda: bool):
    from tpad.train import TrainConfig
    return TrainConfig(lr=LR, batch_size=batch, epochs=1, max_steps=steps, warmup_steps=0, warmup_ratio=0.0,
                       schedule='constant', max_grad_norm=1.0, gradient_checkpointing=True,
                       mixed_precision='bf16' if cuda else 'no', num_workers=workers, shuffle=False, log_every=1,
                       seed=0)


def loss_check(losses: list) -> dict:
    "Mean loss of the first and last k steps (k = 5, or half the steps when fewer than 10) and whether it fell."
    k = max(1, min(5, len(losses) // 2))
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    return dict(loss_first=first, loss_last=last, loss_k=k, loss_drop=first - last, loss_decreased=last < first)


def timing(clock: ForwardClock, batch: int, tokens_per_row: float, steps: int) -> dict:
    times = clock.step_intervals()
    if len(times) != steps - 1: raise RuntimeError(f'{len(clock.marks)} forward calls for {steps} steps of {clock.calls}')
    timed = times[min(WARMUP_INTERVALS, len(times) - 1):]
    med = statistics.median(timed)
    return dict(steps_timed=len(timed), step_s_median=med, samples_per_s=batch / med,
                tokens_per_s=batch * tokens_per_row / med, first_step_s=times[0] if times else None)


def _tokens(batch: dict) -> float:
    return float(batch['attention_mask'].sum(1).float().mean())


def phase_stage1(ctx, steps: int) -> dict:
    "Stage 1: `train_knowledge` on the toy batch repeated `steps` times."
    import pandas as pd
    from tpad.stage1 import KnowledgeData, Stage1Config, train_knowledge
    b = MODELS[ctx.key]['stage1']['batch']
    cfg = Stage1Config(train=train_config(b, steps, ctx.workers, ctx.cuda), target_field='text',
                       answer_field='category', max_target_tokens=48, holdout_share=0.0, seed=0)
    toy = ctx.items.iloc[:b]
    probe = KnowledgeData(toy, ctx.processor, cfg, ctx.mcfg)
    probe = probe.collate([probe[i] for i in range(len(probe))])
    tokens, target = _tokens(probe), float((probe['labels'] != -100).sum(1).float().mean())
    with ForwardClock(ctx.model, ctx.sync) as clock:
        result = train_knowledge(ctx.model, ctx.processor, pd.concat([toy] * steps, ignore_index=True), cfg, ctx.mcfg,
                                 out_dir='')
    ctx.model = result.model
    losses = [r['loss'] for r in result.history if 'loss' in r]
    return dict(batch=b, steps=steps, tokens_per_row=tokens, target_tokens_per_row=target, train_s=result.seconds,
                losses=losses, **timing(clock, b, tokens, steps), **loss_check(losses))


def phase_stage2(ctx, steps: int) -> dict:
    "Stage 2a: `train_transfer` on toy sessions (5 items + a distinct next item each), repeated `steps` times."
    import types
    import numpy as np
    from tpad.preprocess import Samples
    from tpad.stage2 import Stage2Config, TransitionData, train_transfer
    b = MODELS[ctx.key]['stage2']['batch']
    n = len(ctx.items)
    rng = np.random.default_rng(1)
    nxt = rng.choice(n, b, replace=False) + 1  # item indices start at 1; distinct next items: InfoNCE negatives
    clicks = np.concatenate([rng.integers(1, n + 1, (b, SESSION_ITEMS)), nxt[:, None]], 1).reshape(-1)
    starts = np.arange(b) * (SESSION_ITEMS + 1)
    samples = Samples(clicks, np.tile(starts, steps), np.tile(starts + SESSION_ITEMS, steps), np.tile(np.arange(b), steps))
    prepared = types.SimpleNamespace(n_items=n, item_ids=np.array([None, *ctx.items['item_id']], dtype=object),
                                     samples={'train': samples})  # what train_transfer reads of a `Prepared`
    cfg = Stage2Config(train=train_config(b, steps, ctx.workers, ctx.cuda), lambda_next=1.0,
                       temperature=0.1, max_train_samples=0, max_val_samples=0, max_target_tokens=32)
    probe = TransitionData(samples.subset(np.arange(b)), prepared, ctx.items, ctx.processor, cfg, ctx.mcfg)
    probe = probe.collate([probe[i] for i in range(b)])
    session, item = _tokens(probe['session']), _tokens(probe['item'])
    with ForwardClock(ctx.model, ctx.sync, calls=2) as clock:  # the session prompts, then the next items' prompts
        result = train_transfer(ctx.model, ctx.processor, prepared, ctx.items, cfg, ctx.mcfg, out_dir='')
    ctx.model = result.model
    losses = [r['loss'] for r in result.history if 'loss' in r]
    last = result.history[-1]
    return dict(batch=b, steps=steps, tokens_per_row=session + item, session_tokens_per_row=session,
                item_tokens_per_row=item, train_s=result.seconds, losses=losses,
                gen_last=last.get('gen'), nce_last=last.get('nce'),
                **timing(clock, b, session + item, steps), **loss_check(losses))


def phase_extract(ctx, n_items: int) -> dict:
    "Item features of `n_items` items with the knowledge adapter through `item_features`, after a one-batch warm-up."
    import torch
    from tpad.mllm import item_features, prompt_lengths
    b = MODELS[ctx.key]['extract']['batch']
    items = ctx.items.iloc[:n_items]
    run = lambda rows: item_features(ctx.model, ctx.processor, rows, ctx.mcfg, batch_size=b, adapter='knowledge',
                                     num_workers=ctx.workers)
    t0 = time.perf_counter()
    run(items.iloc[:b])
    ctx.sync()
    warm = time.perf_counter() - t0
    if ctx.cuda: torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    h = run(items)
    ctx.sync()
    seconds = time.perf_counter() - t0
    d = ctx.model.get_base_model().config.get_text_config().hidden_size
    if tuple(h.shape) != (n_items, d) or not bool(torch.isfinite(h).all()):
        raise AssertionError(f'features of shape {tuple(h.shape)} (expected {(n_items, d)}), finite: {bool(torch.isfinite(h).all())}')
    tokens = statistics.fmean(prompt_lengths(items, ctx.processor, ctx.mcfg))
    return dict(batch=b, items=n_items, tokens_per_row=tokens, warmup_s=warm, timed_s=seconds,
                items_per_s=n_items / seconds, samples_per_s=n_items / seconds, tokens_per_s=n_items * tokens / seconds,
                feature_dim=d, features_finite=True)


def run_model(args) -> None:
    "One model in this process: build it, then each phase; one `PHASE {json}` line on stdout per finished phase."
    t_start = time.perf_counter()
    import types
    import torch
    import transformers
    import peft
    from tpad.mllm import MLLMConfig, add_adapters, parameter_counts
    key, device = args.child, args.device
    spec, cuda = MODELS[key], args.device.startswith('cuda')
    sizes = json.loads(args.sizes)
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(142))  # a backstop should the driver be gone: its limit + 30 s
    signal.alarm(int(args.limit) + 30)
    if args.threads: torch.set_num_threads(args.threads)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    log = lambda *a: print(f'[{key}]', *a, flush=True)
    emit = lambda tag, d: print(f'{tag} ' + json.dumps(d), flush=True)
    dtype_name = 'bfloat16' if cuda else 'float32'
    n_items = max(sizes['extract'], spec['stage1']['batch'], (SESSION_ITEMS + 1) * spec['stage2']['batch'], 64)
    work = Path(tempfile.mkdtemp(prefix=f'tpad-gpu-check-{key}-', dir=args.workdir))
    try:
        t0 = time.perf_counter()
        items, processor, model = build(key, n_items, work, device, getattr(torch, dtype_name))
        sync()
        workers = pick_workers(args.workers, spec['extract']['batch'], device)[0]
        mcfg = MLLMConfig(dtype=dtype_name, device=device, image_size=spec['image_px'], item_fields='title,category',
                          max_text_tokens=32, max_session_items=SESSION_ITEMS, num_workers=workers)
        model = add_adapters(model, mcfg)
        counts = parameter_counts(model)
        built = dict(seconds=time.perf_counter() - t0, start_s=t0 - t_start, parameters=spec['parameters'],
                     lora_trainable=counts['trainable'], items=n_items, workers=workers, dtype=dtype_name,
                     device_name=torch.cuda.get_device_name(device) if cuda else cpu_name(),
                     weights_gib=torch.cuda.memory_allocated(device) / 2 ** 30 if cuda else None,
                     torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
        emit('BUILT', built)
        log(f"{spec['parameters']:,} random weights built on {built['device_name']} in {built['seconds']:.1f} s "
            f"({dtype_name}, {type(model.get_base_model()).__name__}, {counts['trainable']:,} LoRA weights trainable), "
            f"{workers} DataLoader workers")
        ctx = types.SimpleNamespace(key=key, items=items, processor=processor, model=model, mcfg=mcfg, sync=sync,
                                    cuda=cuda, workers=workers)
        run_phase = dict(stage1=phase_stage1, stage2=phase_stage2, extract=phase_extract)
        planned = dict(start=spec['est']['start'] + spec['est']['build'])
        done_est = planned['start']
        for i, ph in enumerate(PHASES):
            n, cut = sizes[ph], None
            elapsed = time.perf_counter() - t_start
            slow = max(1.0, elapsed / done_est)  # how much slower than planned this model has been so far
            rest = PHASES[i:]
            need = slow * sum(phase_seconds(key, p, sizes[p]) for p in rest)
            left = args.limit - elapsed - 10  # 10 s for the last words
            if need > left:  # cut the remaining phases to what is left of the time limit
                fixed = sum(spec['est'][p][0] for p in rest)
                var = sum(sizes[p] * spec['est'][p][1] for p in rest)
                f = max(0.0, (left / slow - fixed) / var) if var else 0.0
                n = max(_floor(ph, key), int(n * f))
                if n < sizes[ph]: cut = dict(planned=sizes[ph], slower_than_plan=slow, seconds_left=left)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            static = torch.cuda.memory_allocated(device) if cuda else None
            t0 = time.perf_counter()
            try: row = run_phase[ph](ctx, n)
            except Exception as e:  # noqa: BLE001 -- one failing phase (out of memory, a bug) must not cost the others
                kind = 'out of memory' if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
                row = dict(error=f'{kind}: {str(e)[:300]}', traceback=traceback.format_exc()[-3000:])
                print(row['traceback'], flush=True)
            row.update(phase=ph, seconds=time.perf_counter() - t0, est_s=phase_seconds(key, ph, n),
                       peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
                       static_gib=static / 2 ** 30 if cuda else None)
            if cut: row['cut_for_time'] = cut
            emit('PHASE', row)
            done_est += phase_seconds(key, ph, sizes[ph])
            if 'error' in row: log(f"{ph}: {row['error']}"); continue
            peak = f", peak {row['peak_gib']:.1f} GiB" if cuda else ''
            if ph == 'extract':
                log(f"extract: {row['items']} items in {row['timed_s']:.1f} s = {row['items_per_s']:.1f} items/s "
                    f"(batch {row['batch']}, {row['tokens_per_row']:.0f} tokens an item){peak}")
            else:
                every = max(1, len(row['losses']) // 6)
                trace = ', '.join(f'{s + 1}: {x:.3f}' for s, x in enumerate(row['losses'])
                                  if s % every == 0 or s + 1 == len(row['losses']))
                log(f"{ph}: {row['steps']} steps of {row['batch']} x {row['tokens_per_row']:.0f} tokens, "
                    f"{row['step_s_median']:.3f} s a step = {row['samples_per_s']:.2f} samples/s "
                    f"({row['tokens_per_s']:.0f} tokens/s){peak}; loss by step {trace}; first {row['loss_k']} "
                    f"{row['loss_first']:.3f} -> last {row['loss_k']} {row['loss_last']:.3f} "
                    f"({'decreased' if row['loss_decreased'] else 'DID NOT DECREASE'})"
                    + (f"; cut to {n} steps for time" if cut else ''))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- driver -------------------------------------------------------------------------------------------------------
def run_child(key: str, sizes: dict, limit: float, args, log=print) -> dict:
    "Run model `key` in its own process under `limit` seconds; its BUILT and PHASE records, status and log tail."
    cmd = [sys.executable, __file__, '--child', key, '--device', args.device, '--sizes', json.dumps(sizes),
           '--limit', str(limit)]
    if args.workers is not None: cmd += ['--workers', str(args.workers)]
    if args.workdir: cmd += ['--workdir', args.workdir]
    env = dict(os.environ, TOKENIZERS_PARALLELISM='false', PYTHONUNBUFFERED='1')
    if args.threads: cmd += ['--threads', str(args.threads)]; env['OMP_NUM_THREADS'] = str(args.threads)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own process group: the time limit ends its workers too
    timed_out = threading.Event()

    def stop():
        timed_out.set()
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: return
            try: proc.wait(wait)
            except subprocess.TimeoutExpired: continue
            return

    timer = threading.Timer(limit, stop)
    timer.start()
    out = dict(model=key, sizes=sizes, limit_s=limit, phases={}, tail=[])
    try:
        for line in proc.stdout:
            line = line.rstrip('\n')
            if line.startswith('PHASE '):
                row = json.loads(line[6:])
                out['phases'][row['phase']] = row
            elif line.startswith('BUILT '): out['built'] = json.loads(line[6:])
            else:
                log(f'  {line}' if not line.startswith('[') else line)
                out['tail'] = (out['tail'] + [line])[-30:]
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None: stop()  # the driver itself was stopped: take the model process down with it
    out['seconds'] = time.perf_counter() - t0
    out['status'] = (f'time limit ({limit:.0f} s)' if timed_out.is_set()
                     else 'ok' if proc.returncode == 0 else f'exit {proc.returncode}')
    if out['status'] != 'ok': log(f"=== {key}: {out['status']} after {out['seconds']:.0f} s; phases done: {list(out['phases']) or 'none'} ===")
    return out


def checks(result: dict) -> list:
    "What failed: missing phases, errors, losses that did not fall, throughputs that are not positive."
    bad = []
    for key, m in result['models'].items():
        if m['status'] != 'ok': bad.append(f"{key}: {m['status']}")
        for ph in PHASES:
            r = m['phases'].get(ph)
            if r is None: bad.append(f'{key} {ph}: missing'); continue
            if 'error' in r: bad.append(f"{key} {ph}: {r['error'][:120]}"); continue
            if not r.get('samples_per_s', 0) > 0: bad.append(f'{key} {ph}: throughput not positive')
            if ph != 'extract' and not r['loss_decreased']:
                bad.append(f"{key} {ph}: loss did not decrease ({r['loss_first']:.4f} -> {r['loss_last']:.4f})")
    return bad


def table(result: dict) -> str:
    lines = ['| model | phase | batch | steps / items | tokens a row | step s | samples/s | tokens/s | peak GiB | '
             'loss first -> last | phase s |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for key, m in result['models'].items():
        for ph in PHASES:
            r = m['phases'].get(ph)
            if r is None or 'error' in r:
                lines.append(f"| {key} | {ph} | | | | | | | | {(r or {}).get('error', m['status'])[:60]} | |")
                continue
            n = r['items'] if ph == 'extract' else r['steps']
            step = '-' if ph == 'extract' else f"{r['step_s_median']:.3f}"
            loss = '-' if ph == 'extract' else (f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
                                                 + ('' if r['loss_decreased'] else ' (no)'))
            peak = '-' if r['peak_gib'] is None else f"{r['peak_gib']:.1f}"
            lines.append(f"| {key} | {ph} | {r['batch']} | {n}{' (cut)' if 'cut_for_time' in r else ''} | "
                         f"{r['tokens_per_row']:.0f} | {step} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                         f"{peak} | {loss} | {r['seconds']:.1f} |")
    return '\n'.join(lines)


def expand(shapes: list | None) -> list:
    keys = []
    for s in shapes or ['gpu']:
        for k in GROUPS.get(s, [s]):
            if k not in keys: keys.append(k)
    return keys


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--shapes', action='append', choices=[*GROUPS, *MODELS],
                   help="models; repeat for several. 'gpu' = qwen2vl-2b + llava-7b (default), 'tiny' = qwen2vl-tiny + llava-tiny")
    p.add_argument('--device', default=None, help="'cuda', 'cuda:N' or 'cpu' (default: cuda when available)")
    p.add_argument('--budget', type=float, default=DEFAULT_BUDGET, help='seconds for the whole run: steps and items are scaled down to fit, and each model gets its share as a time limit')
    p.add_argument('--stage1-steps', type=int, default=None, help='Stage 1 steps of every model (default: 30, or fewer to fit --budget)')
    p.add_argument('--stage2-steps', type=int, default=None, help='Stage 2a steps of every model (default: 10, or fewer to fit --budget)')
    p.add_argument('--items', type=int, default=None, help='items to extract per model (default: 1024 for 2b, 512 for 7b, 32 tiny)')
    p.add_argument('--workers', type=int, default=None, help='DataLoader workers of training and extraction (default: min(8, cores - 2) on CUDA, 0 on CPU)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads of each model process (default: 1 on CPU, where the tiny steps are too small to share and a busy machine stalls OpenMP; as torch sets it on CUDA)')
    p.add_argument('--workdir', default=None, help='where the synthetic images go (default: the system temp dir)')
    p.add_argument('--out', type=Path, default=None, help='folder for the JSON and markdown (default: $OUT, else bench/results)')
    p.add_argument('--plan', action='store_true', help='print the plan (steps, items, estimated seconds) and exit')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)  # internal: run one model in this process
    p.add_argument('--sizes', default=None, help=argparse.SUPPRESS)
    p.add_argument('--limit', type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    keys = expand(args.shapes)
    overrides = dict(stage1=args.stage1_steps, stage2=args.stage2_steps, extract=args.items)
    if args.plan:
        pl = plan(keys, args.budget, overrides)
        print(plan_table(pl))
        return pl
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the time limit -> SystemExit: temporary folders removed
    if args.child:
        run_model(args)
        return {}
    t_start = time.perf_counter()
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if not args.device.startswith('cuda') and any(MODELS[k]['gpu'] for k in keys):
        p.error(f"no CUDA device ({args.device}): only --shapes tiny runs on a CPU "
                f"({', '.join(k for k in keys if MODELS[k]['gpu'])} need a GPU: 4.4 / 14 GB of bf16 weights)")
    if args.threads is None and not args.device.startswith('cuda'): args.threads = 1
    pl = plan(keys, args.budget, overrides)
    print(plan_table(pl), flush=True)
    result = dict(bench='gpu_check', device=args.device, budget_s=args.budget, plan=pl, lr=LR, models={},
                  when=time.strftime('%Y-%m-%dT%H:%M:%S'))
    for i, key in enumerate(keys):
        left = args.budget - (time.perf_counter() - t_start)
        share = pl['models'][key]['est_s'] / sum(pl['models'][k]['est_s'] for k in keys[i:])
        limit = max(1.0, left * share)
        print(f'=== {key} (time limit {limit:.0f} s; estimate {pl["models"][key]["est_s"]:.0f} s) ===', flush=True)
        result['models'][key] = run_child(key, pl['models'][key]['sizes'], limit, args)
        if 'built' in result['models'][key]: result['device_name'] = result['models'][key]['built']['device_name']
    result['seconds'] = time.perf_counter() - t_start
    result['failures'] = checks(result)
    result['ok'] = not result['failures']
    out = args.out or (Path(os.environ['OUT']) if os.environ.get('OUT') else ROOT / 'bench' / 'results')
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check-{args.device.replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}"
    md = table(result)
    (out / f'{stem}.json').write_text(json.dumps(result, indent=1) + '\n')
    (out / f'{stem}.md').write_text(f"{result.get('device_name', args.device)}, {result['seconds']:.0f} s in all\n\n{md}\n")
    print()
    print(md)
    print(f"\n{result.get('device_name', args.device)}: {result['seconds']:.0f} s in all (budget {args.budget:.0f} s); "
          + ('all checks passed' if result['ok'] else 'FAILED: ' + '; '.join(result['failures'])))
    print(f'wrote {out / stem}.json and .md')
    return result


if __name__ == '__main__':
    r = main()
    sys.exit(0 if r.get('ok', True) else 1)
