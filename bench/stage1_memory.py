"""Peak memory of Stage-1-style LoRA training steps, measured, next to a formula for where nothing was measured.

One row = one model shape (tiny / Qwen2-VL-2B / Qwen2-VL-7B shapes, RANDOM weights, built in code as in
bench/gpu_extract.py) x one batch size x gradient checkpointing off/on. Each row runs in a fresh process: the base
model in bfloat16 (CUDA) or float32 (CPU) with sdpa attention, `tpad.mllm.add_adapters` (LoRA r=8, dropout 0.05, on the
language model's q/k/v/o projections; adapters `knowledge` (trainable) and `transfer`), optionally
`tpad.mllm.enable_gradient_checkpointing`, item prompts (224 px image -> 64 image tokens, title, category, the readout
instruction) with the description as the generation target (cut at 48 tokens; prompt and padding labels -100), then
two steps of forward + backward of the causal-LM loss + AdamW (the first step allocates the optimizer states).
Measured: on CUDA `torch.cuda.max_memory_allocated()` over the two steps (absolute: weights included); on CPU (tiny
only) the increase of the peak resident set size over the two steps (weights excluded: resident before).

The formula (bytes). T = b x s tokens in a batch of b rows of s tokens; L decoder layers, h hidden size, H heads,
kv = KV heads x head dim, i MLP width, V vocabulary, P all weights, r = 8 LoRA rank; w = 2 bytes for bfloat16 weights
and activations; m = bytes of a dropout-mask entry (1 on CUDA, 4 on CPU).

  weights        w P                                   the frozen base, vision tower included
  LoRA           20 N,  N = L r (4h + 2(h + kv))        per adapter: q, o: r(h + h); k, v: r(h + kv). The trainable
                                                        adapter: fp32 weight + gradient + AdamW m, v (16 N); the
                                                        other adapter: fp32 weight (4 N)
  activations    T L a,  a = 36h + 6i (+ small)         what autograd keeps per token and decoder layer (w = 2, m = 1):
                   2 RMSNorms: their fp32 input copy, 2 x 4h; LoRA on q, k, v, o: the fp32 input of lora_A, 4 x 4h,
                   and the dropout mask, 4 x m h; sdpa: q and k, v (expanded to all H heads: padding needs a mask, so
                   no GQA kernel) and the output, 4 x w h; SwiGLU MLP: gate, silu(gate), up, 3 x w i.
                   Small: lora_B inputs 16r, log-sum-exp 4H, rotary table w h/H, mask row w s (0.7 KiB for 2B/7B).
                   Frozen projections keep nothing (their weights get no gradient), nor does the frozen vision tower
                   (no gradient reaches it).
  checkpointing  T (L w h + a)  instead of  T L a      each layer's input, and one layer recomputed in backward
  logits         (w + 8) T V                           bf16 logits (2), their fp32 copy (4), the log-softmax (4)
  final norm     4h T

  M(no checkpointing) = w P + 20 N + T (L a + 4h) + (w + 8) T V
  M(checkpointing)    = w P + 20 N + T (L w h + a + 4h) + (w + 8) T V

The general a = 8h + 16h + 4mh + 4wh + 3wi (+ small): 36h + 6i for bf16 on CUDA. `--check-formula` counts the bytes
autograd really keeps (torch.autograd.graph.saved_tensors_hooks) for the tiny shapes in bf16 on CPU (m = 4) and
compares them with these terms: they agree within 0.1 %. Left out: transient buffers (gradients of one layer in
backward, the vision tower's forward, the causal mask, allocator rounding), so measured peaks run somewhat higher.

Shapes (Qwen2-VL released configs; parameters counted on the meta device):
  2B: P = 2,208,985,600 (language 1,543,714,304 with tied embeddings; vision 665,271,296), L = 28, h = 1536, H = 12,
      kv = 2 x 128 = 256, i = 8960, V = 151,936;  N = 2,179,072;  a = 109,056 B + small (109,768 B at s = 140)
  7B: P = 8,291,375,616 (language 7,615,616,512; vision 675,759,104), L = 28, h = 3584, H = 28, kv = 4 x 128 = 512,
      i = 18944, V = 152,064;  N = 5,046,272;  a = 242,688 B + small (243,464 B at s = 140)

Estimates at s = 140 tokens (64 image + 2 vision markers + title, category, instruction ~22 + target <= 48 + eos,
right-padded to the batch's longest), decimal GB:
               b = 8: no ckpt / ckpt      b = 32: no ckpt / ckpt
  2B            9.61 / 6.39              25.07 / 12.17      (weights 4.42, logits 1.70 / 6.81)
  7B           26.04 / 18.90             54.10 / 25.55      (weights 16.58, logits 1.70 / 6.81)
(`--formula --seq S --batches ...` prints this for other sizes.)

usage:
  python bench/stage1_memory.py                        # CUDA: tiny, 2b, 7b x batch 8, 32 x checkpointing off, on
  python bench/stage1_memory.py --device cpu           # CPU: the tiny rows (peak RSS increase)
  python bench/stage1_memory.py --formula [--seq 140]  # the formula table only, nothing built
  python bench/stage1_memory.py --check-formula        # saved-tensor bytes of the tiny shapes against the formula
Writes JSON to $OUT if set, else bench/results/ (gitignored), or to --out."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):
    if str(p) not in sys.path: sys.path.insert(0, str(p))
from gpu_extract import IMAGE_PX, SHAPES, TOKENIZER_VOCAB, synthetic_items  # noqa: E402

LORA_R = 8
TARGET_TOKENS = 48
PARAMETERS = {'2b': 2_208_985_600, '7b': 8_291_375_616, 'tiny': 1_585_664}  # asserted on every built model


def per_layer_bytes(shape: str, seq: int, w: int = 2, m: int = 1) -> int:
    "a: bytes autograd keeps per token and decoder layer (`w`: activation bytes, `m`: dropout-mask bytes, 1 CUDA / 4 CPU)."
    t = SHAPES[shape]['text']
    h, i, H = t['hidden_size'], t['intermediate_size'], t['num_attention_heads']
    big = 8 * h + 16 * h + 4 * m * h + 4 * w * h + 3 * w * i  # norms, LoRA inputs, LoRA dropout masks, sdpa, MLP
    small = 4 * 4 * LORA_R + 4 * H + w * (h // H) + w * seq  # lora_B inputs, sdpa log-sum-exp, rotary table, mask row
    return big + small


def formula(shape: str, batch: int, seq: int, checkpointing: bool, w: int = 2, m: int = 1) -> dict:
    "The estimate of the docstring, in bytes, by term (`w`: bytes of a weight/activation, `m`: of a dropout-mask entry)."
    t = SHAPES[shape]['text']
    L, h, V, H = (t[k] for k in ('num_hidden_layers', 'hidden_size', 'vocab_size', 'num_attention_heads'))
    kv = t['num_key_value_heads'] * h // H
    T = batch * seq
    n_lora = L * LORA_R * (4 * h + 2 * (h + kv))
    a = per_layer_bytes(shape, seq, w, m)
    terms = dict(weights=w * PARAMETERS[shape], lora=20 * n_lora,
                 activations=T * (L * w * h + a) if checkpointing else T * L * a,
                 logits=(w + 8) * T * V, final_norm=4 * h * T)
    terms['total'] = sum(terms.values())
    return terms


def _rss(field: str) -> int:
    "VmRSS / VmHWM of this process in bytes (Linux)."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'): return int(line.split()[1]) * 1024
    raise OSError(f'{field} not in /proc/self/status')


def setup(shape: str, batch: int, checkpointing: bool, device: str, dtype_name: str):
    "(model with adapters, its inputs with labels, the encoded batch) of one row, built in this process."
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil
    from tpad.mllm import (MLLMConfig, Qwen2VLImageOnlyProcessor, model_inputs, add_adapters, corpus_texts,
                           enable_gradient_checkpointing, encode, item_prompt, tiny_tokenizer)
    from gpu_extract import qwen2vl_config
    dtype = {'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype_name]
    with tempfile.TemporaryDirectory(prefix='tpad-stage1-memory-') as tmp:
        items = synthetic_items(batch, Path(tmp) / 'images', distinct_images=batch)
        tok = tiny_tokenizer('qwen2_vl', corpus_texts(items), vocab_size=TOKENIZER_VOCAB)
        ids = tok.convert_tokens_to_ids
        config = qwen2vl_config(shape, len(tok), dict(pad=tok.pad_token_id, eos=tok.eos_token_id, image=ids('<|image_pad|>'),
                                                      video=ids('<|video_pad|>'), start=ids('<|vision_start|>'),
                                                      end=ids('<|vision_end|>')))
        v = SHAPES[shape]['vision']
        processor = Qwen2VLImageOnlyProcessor(
            image_processor=Qwen2VLImageProcessorPil(patch_size=v['patch_size'], merge_size=v['spatial_merge_size'],
                                                     temporal_patch_size=v['temporal_patch_size'],
                                                     min_pixels=IMAGE_PX ** 2, max_pixels=IMAGE_PX ** 2),
            tokenizer=tok)
        cfg = MLLMConfig(image_size=IMAGE_PX, max_text_tokens=64, item_fields='title,category', lora_r=LORA_R)
        prompts = [item_prompt(r, processor, cfg) for r in items.to_dict('records')]
        b = encode(processor, prompts, items.text.tolist(), padding_side='right', max_target_tokens=TARGET_TOKENS)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation='sdpa')
    model.to(device)  # a no-op when the weights were created there
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == PARAMETERS[shape], (shape, n_params)
    if checkpointing: enable_gradient_checkpointing(model)
    model = add_adapters(model, cfg)
    return model, dict(model_inputs(model, b), labels=b['labels'].to(device)), b


def run_row(shape: str, batch: int, checkpointing: bool, device: str, dtype_name: str) -> dict:
    "One measured row, in this process."
    import torch
    from tpad.mllm import parameter_counts
    cuda = device.startswith('cuda')
    model, inputs, b = setup(shape, batch, checkpointing, device, dtype_name)
    counts = parameter_counts(model)
    n_params = counts['total'] - sum(p.numel() for n, p in model.named_parameters() if '.lora_' in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    if cuda:
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        try: Path('/proc/self/clear_refs').write_text('5')  # reset the peak RSS (VmHWM) to the current RSS
        except OSError: pass  # then VmHWM may include the build's own peak (reported as such below)
        static = _rss('VmRSS')
    t0 = time.perf_counter()
    losses = []
    for _ in range(2):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    if cuda: torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 2
    if cuda: peak, measured = torch.cuda.max_memory_allocated(), 'cuda max_memory_allocated (absolute)'
    else: peak, measured = _rss('VmHWM'), 'peak RSS increase over the two steps'
    seq = int(b['input_ids'].shape[1])
    return dict(shape=shape, batch=batch, checkpointing=checkpointing, device=device,
                device_name=torch.cuda.get_device_name() if cuda else 'cpu', dtype=dtype_name, seq=seq,
                target_tokens=int((b['labels'] != -100).sum(1).float().mean()),
                parameters=n_params, lora_trainable=counts['trainable'], static_gb=static / 1e9,
                peak_gb=(peak if cuda else peak - static) / 1e9, measured=measured, step_s=seconds, losses=losses,
                formula_gb={k: x / 1e9 for k, x in formula(shape, batch, seq, checkpointing, 2 if dtype_name == 'bfloat16' else 4,
                                                           1 if cuda else 4).items()})


def check_formula(batch: int = 8) -> dict:
    "Bytes autograd keeps in one forward of the tiny shapes (bfloat16, CPU), counted, against the formula's saved terms."
    import torch
    model, inputs, b = setup('tiny', batch, False, 'cpu', 'bfloat16')
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}
    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params: seen.setdefault(key, t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).loss
    t = SHAPES['tiny']['text']
    L, h, V = t['num_hidden_layers'], t['hidden_size'], t['vocab_size']
    seq = int(b['input_ids'].shape[1])
    T, m = batch * seq, 4  # CPU dropout masks are fp32
    # saved: every layer's a, the final norm's fp32 input, the log-softmax output (4 T V); layer 0 keeps no copy of its
    # input for its first norm nor q/k/v dropout masks (its input, the embeddings, needs no gradient)
    expected = T * (L * per_layer_bytes('tiny', seq, 2, m) + 4 * h) + 4 * T * V - T * (4 * h + 3 * m * h)
    counted = sum(seen.values())
    return dict(batch=batch, seq=seq, counted_mb=counted / 1e6, formula_mb=expected / 1e6, ratio=counted / expected)


def table(rows: list) -> str:
    out = ['| shapes | batch | grad. ckpt | tokens/row | measured GB | formula GB | step s | note |',
           '|---|---|---|---|---|---|---|---|']
    for r in rows:
        f = r.get('formula_gb', {})
        measured = f"{r['peak_gb']:.2f}" if 'peak_gb' in r else '-'
        if 'peak_gb' in r and not r['device'].startswith('cuda'):
            formula_gb = f"{f['total'] - f['weights']:.2f} (no weights)"
        else: formula_gb = f"{f['total']:.2f}" if f else '-'
        note = r.get('error') or r.get('measured', 'formula only')
        out.append(f"| {r['shape']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | {r.get('seq', '-')} | "
                   f"{measured} | {formula_gb} | {r.get('step_s', 0):.2f} | {note} |")
    return '\n'.join(out)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.splitlines()[1:]))
    p.add_argument('--shapes', action='append', choices=sorted(SHAPES), help='repeat for several (default: tiny, 2b, 7b on CUDA; tiny on CPU)')
    p.add_argument('--batches', default='8,32', help='comma-separated batch sizes')
    p.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda when available)")
    p.add_argument('--dtype', default=None, choices=['bfloat16', 'float32'], help='default: bfloat16 on CUDA, float32 on CPU')
    p.add_argument('--row-timeout', type=int, default=300, help='seconds one row may take')
    p.add_argument('--formula', action='store_true', help='print the formula table only')
    p.add_argument('--check-formula', action='store_true', help="count the bytes autograd keeps (tiny, bf16, CPU) against the formula")
    p.add_argument('--seq', type=int, default=140, help='tokens per row for --formula')
    p.add_argument('--out', type=Path, default=None, help='folder for the JSON (default: $OUT, else bench/results)')
    p.add_argument('--row', default=None, help=argparse.SUPPRESS)  # internal: 'shape,batch,ckpt,device,dtype'
    args = p.parse_args(argv)
    batches = [int(x) for x in args.batches.split(',') if x.strip()]
    if args.row:
        shape, batch, ckpt, device, dtype = args.row.split(',')
        print('ROW ' + json.dumps(run_row(shape, int(batch), ckpt == '1', device, dtype)), flush=True)
        return []
    if args.check_formula:
        c = check_formula()
        print(f"tiny shapes, bf16 on CPU, batch {c['batch']} x {c['seq']} tokens: autograd keeps {c['counted_mb']:.2f} MB, "
              f"the formula says {c['formula_mb']:.2f} MB (ratio {c['ratio']:.3f})")
        return [c]
    if args.formula:
        rows = [dict(shape=s, batch=b, checkpointing=c, device='-', seq=args.seq,
                     formula_gb={k: x / 1e9 for k, x in formula(s, b, args.seq, c).items()})
                for s in (args.shapes or ['2b', '7b']) for b in batches for c in (False, True)]
        print(table(rows))
        return rows
    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cuda = device.startswith('cuda')
    dtype = args.dtype or ('bfloat16' if cuda else 'float32')
    shapes = args.shapes or (['tiny', '2b', '7b'] if cuda else ['tiny'])
    if not cuda and set(shapes) - {'tiny'}: p.error('on CPU only --shapes tiny is measured (use --formula for the others)')
    rows = []
    for shape in shapes:
        for batch in batches:
            for ckpt in (False, True):
                cmd = [sys.executable, __file__, '--row', f"{shape},{batch},{int(ckpt)},{device},{dtype}"]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
                    found = [l for l in r.stdout.splitlines() if l.startswith('ROW ')]
                    if found: row = json.loads(found[-1][4:])
                    else:
                        err = (r.stderr.strip().splitlines() or ['no output'])[-1]
                        row = dict(shape=shape, batch=batch, checkpointing=ckpt, device=device,
                                   error=('out of memory: ' if 'out of memory' in r.stderr.lower() else '') + err[:200])
                except subprocess.TimeoutExpired:
                    row = dict(shape=shape, batch=batch, checkpointing=ckpt, device=device, error=f'over {args.row_timeout} s')
                if 'seq' not in row:  # failed: the estimate at the usual length
                    row['formula_gb'] = {k: x / 1e9 for k, x in formula(shape, batch, 140, ckpt).items()}
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    dest = args.out or (Path(os.environ['OUT']) if os.environ.get('OUT') else ROOT / 'bench' / 'results')
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"stage1_memory-{device.split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(bench='stage1_memory', rows=rows, lora_r=LORA_R, target_tokens=TARGET_TOKENS,
                                    when=time.strftime('%Y-%m-%dT%H:%M:%S')), indent=2) + '\n')
    print(f'wrote {path}')
    return rows


if __name__ == '__main__':
    main()
