"""Item-feature extraction speed: the plain Hugging Face forward against the kit's `tpad.mllm.item_features`.

A RANDOM-WEIGHT Qwen2-VL with the exact shapes of Qwen2-VL-2B (`--shapes 2b`) or Qwen2-VL-7B (`--shapes 7b`), or a
tiny one (`--shapes tiny`), is built from a `Qwen2VLConfig` in code (nothing is downloaded), directly on the device in
bfloat16 with sdpa attention, with an offline byte-level BPE tokenizer (`tpad.mllm.tiny_tokenizer`, trained on the
synthetic item texts; every id is far below the model's vocabulary) and the Qwen2-VL image processor at 224 x 224 px
(min_pixels = max_pixels = 224*224: 16 x 16 patches of 14 px, merged 2 x 2 into 64 image tokens). Model and processor
are saved to a temporary folder and loaded back through `tpad.mllm.load_mllm`, the kit's own loading path.

The items are synthetic: a 224 px RGB JPEG on disk, a title and a description (about 48 text tokens in all, spread
over about 40-58 so that batches need padding, as a real catalogue's do), and the kit's item prompt.

Measured, after a warm-up, with torch.cuda.synchronize around each timed repeat:
  plain  the Hugging Face forward alone: batches of `--batch` (128) items pre-processed by the processor in input
         order and already on the GPU, `model(**batch, output_hidden_states=True)` under torch.inference_mode;
  kit    `tpad.mllm.item_features` end to end on the same items: prompt building (image files read), processor,
         length-bucketed batching in DataLoader workers, pinned non-blocking transfers, readout, features on the CPU.
Both in items/s (best and median of `--repeats`), their ratio (target: kit >= 0.9 x plain), peak GPU memory of each,
the device name. Reference numbers (H100, plain forward, batch 128, bf16/sdpa): 275 items/s for the 2B shapes, 159
for the 7B shapes.

usage:
  python bench/gpu_extract.py --shapes 2b --shapes 7b       # one GPU; about 5-7 min on an H100 (mostly save/load)
  bash bench/gpu_run.sh                                     # the same, each shape under its own time limit + summary
  python bench/gpu_extract.py --shapes tiny --device cpu    # CPU smoke run, < 1 min
  python bench/gpu_extract.py --summary DIR                 # the table of the JSON files in DIR

Writes one JSON per shape to $OUT if set, else bench/results/ (gitignored), or to --out."""
import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # run from a checkout without installing the kit

# Qwen2-VL's released configs (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct config.json): the language model
# and the vision tower. `vision.hidden_size` is the merger's output width (= the language model's hidden size).
SHAPES = {
    '2b': dict(text=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         rope_parameters=dict(rope_type='default', rope_theta=1000000.0, mrope_section=[16, 24, 24])),
               vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, hidden_size=1536),
               tie_word_embeddings=True, items=2048, batch=128),
    '7b': dict(text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         rope_parameters=dict(rope_type='default', rope_theta=1000000.0, mrope_section=[16, 24, 24])),
               vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, hidden_size=3584),
               tie_word_embeddings=False, items=1024, batch=128),
    'tiny': dict(text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256, vocab_size=4096, rms_norm_eps=1e-6, max_position_embeddings=4096,
                           rope_parameters=dict(rope_type='default', rope_theta=1000000.0, mrope_section=[4, 6, 6])),
                 vision=dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                             temporal_patch_size=2, hidden_size=128),
                 tie_word_embeddings=False, items=64, batch=16),
}
IMAGE_PX = 224
TOKENIZER_VOCAB = 4000  # trained BPE size; far below every shape's vocab_size


def parameter_count(shape: str) -> dict:
    "Weights of a shape, counted on the meta device (no memory): language model, vision tower, total."
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    with torch.device('meta'): m = Qwen2VLForConditionalGeneration(qwen2vl_config(shape, 300))
    visual = sum(p.numel() for n, p in m.named_parameters() if '.visual.' in f'.{n}')
    total = sum(p.numel() for p in m.parameters())
    return dict(total=total, vision=visual, language=total - visual)


def qwen2vl_config(shape: str, n_tokens: int, specials: dict | None = None):
    "The `Qwen2VLConfig` of `shape`, with the special-token ids of our tokenizer (`n_tokens` tokens)."
    from transformers import Qwen2VLConfig
    s = SHAPES[shape]
    if n_tokens > s['text']['vocab_size']: raise ValueError(f"tokenizer has {n_tokens} tokens > vocab {s['text']['vocab_size']}")
    specials = specials or dict(pad=0, eos=2, image=5, video=6, start=3, end=4)
    text = dict(s['text'], pad_token_id=specials['pad'], eos_token_id=specials['eos'], bos_token_id=None,
                tie_word_embeddings=s['tie_word_embeddings'])
    return Qwen2VLConfig(text_config=text, vision_config=dict(s['vision']), image_token_id=specials['image'],
                         video_token_id=specials['video'], vision_start_token_id=specials['start'],
                         vision_end_token_id=specials['end'], tie_word_embeddings=s['tie_word_embeddings'])


def synthetic_items(n: int, folder: Path, seed: int = 0, distinct_images: int = 256):
    "n items: item_id, title, text (~48 tokens together: 36-52 words + punctuation), category, image (a 224 px JPEG in `folder`)."
    import numpy as np
    import pandas as pd
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    syllables = ['ka', 'lo', 'mi', 'ne', 'ru', 'ta', 'vo', 'si', 'pe', 'da', 'go', 'fu', 'ri', 'bo', 'za', 'te']
    words = sorted({''.join(rng.choice(syllables, 3)) for _ in range(900)})[:600]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(n, distinct_images)):
        im = Image.new('RGB', (IMAGE_PX, IMAGE_PX), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, IMAGE_PX - 40, 2))
            x1, y1 = x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))
            draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = folder / f'item{i:05d}.jpg'
        im.save(path, quality=90)
        paths.append(str(path))
    rows = []
    for i in range(n):
        k = int(rng.integers(36, 53))  # words of title + text; one token each once the tokenizer has learnt them
        w = list(rng.choice(words, k))
        rows.append(dict(item_id=f'i{i:05d}', title=' '.join(w[:6]).capitalize(), text=' '.join(w[6:]) + '.',
                         category=str(rng.choice(['lens', 'camera', 'tripod', 'charger'])), image=paths[i % len(paths)]))
    return pd.DataFrame(rows)


def build_model_folder(shape: str, folder: Path, texts: list, device: str, dtype) -> dict:
    "Random-weight model of `shape` built on `device` in `dtype`, saved with tokenizer + 224 px processor to `folder`."
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil
    from tpad.mllm import Qwen2VLImageOnlyProcessor, _as_standard_qwen2_vl, _quiet, tiny_tokenizer
    t0 = time.perf_counter()
    tok = tiny_tokenizer('qwen2_vl', texts, vocab_size=TOKENIZER_VOCAB)
    ids = tok.convert_tokens_to_ids
    specials = dict(pad=tok.pad_token_id, eos=tok.eos_token_id, image=ids('<|image_pad|>'), video=ids('<|video_pad|>'),
                    start=ids('<|vision_start|>'), end=ids('<|vision_end|>'))
    config = qwen2vl_config(shape, len(tok), specials)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation='sdpa')
    model.to(device)  # a no-op when the weights were created there
    if device.startswith('cuda'): torch.cuda.synchronize()
    t_build = time.perf_counter() - t0
    pixels = IMAGE_PX * IMAGE_PX
    s = SHAPES[shape]['vision']
    image_processor = Qwen2VLImageProcessorPil(patch_size=s['patch_size'], merge_size=s['spatial_merge_size'],
                                               temporal_patch_size=s['temporal_patch_size'], min_pixels=pixels,
                                               max_pixels=pixels)
    processor = Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok)
    t0 = time.perf_counter()
    with _quiet():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    _as_standard_qwen2_vl(folder)  # a stock Qwen2-VL folder, as `build_tiny_mllm` writes it
    t_save = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device.startswith('cuda'): torch.cuda.empty_cache()
    return dict(build_s=t_build, save_s=t_save, parameters=n_params, tokenizer_tokens=len(tok),
                folder_gb=sum(f.stat().st_size for f in folder.iterdir()) / 1e9)


def cpu_name() -> str:
    try:
        return next(l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines()
                    if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()


def shm_free_bytes() -> int | None:
    try: return shutil.disk_usage('/dev/shm').free
    except OSError: return None


def pick_workers(requested: int | None, batch: int, device: str) -> tuple[int, str]:
    "DataLoader workers for the kit: as asked, else min(8, cores - 2) on CUDA (0 on CPU), none if /dev/shm is too small."
    cores = os.cpu_count() or 1
    if requested is not None: return requested, 'as asked'
    if not device.startswith('cuda'): return 0, 'CPU run: in the main process'
    workers = max(0, min(8, cores - 2))
    free = shm_free_bytes()
    # in flight: 2 chunks per worker (prefetch) = 2 batches of bf16 pixel values (256 patches x 1176 values x 2 bytes)
    need = lambda w: 2 * batch * 256 * 1176 * 2 * (2 if w else 0)  # x2 margin
    if free is not None and need(workers) > free:
        workers = 0
        return workers, f'/dev/shm has only {free / 1e6:.0f} MB free: prompts built in the main process'
    return workers, f'min(8, {cores} cores - 2)'


def timed_repeats(f, repeats: int, sync) -> list:
    "Seconds of `repeats` calls of `f`, each between two `sync()`s."
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def padded_share(mask_batches) -> float:
    "Share of padding among the tokens computed over batches of attention masks."
    real = sum(int(m.sum()) for m in mask_batches)
    total = sum(m.numel() for m in mask_batches)
    return 1 - real / total


def run_shape(shape: str, args) -> dict:
    import numpy as np
    import torch
    import transformers
    from tpad.data import Report
    from tpad.mllm import MLLMConfig, corpus_texts, item_features, item_prompt, load_mllm, prompt_lengths
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cuda = device.startswith('cuda')
    dtype_name = args.dtype or ('bfloat16' if cuda else 'float32')
    dtype = {'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype_name]
    n = args.items or SHAPES[shape]['items']
    batch = args.batch or SHAPES[shape]['batch']
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    work = Path(tempfile.mkdtemp(prefix=f'tpad-gpu-extract-{shape}-', dir=args.workdir))
    log = lambda *a: print(f'[{shape}]', *a, flush=True)
    try:
        t0 = time.perf_counter()
        items = synthetic_items(n, work / 'images')
        log(f'{n} synthetic items with 224 px JPEGs in {time.perf_counter() - t0:.1f} s')
        made = build_model_folder(shape, work / 'model', corpus_texts(items), device, dtype)
        log(f"random {made['parameters'] / 1e9:.2f} B-weight model built on {device} in {made['build_s']:.1f} s, "
            f"saved ({made['folder_gb']:.1f} GB) in {made['save_s']:.1f} s")
        cfg = MLLMConfig(model=str(work / 'model'), dtype=dtype_name, device=device, attn_implementation='sdpa',
                         local_files_only=True, image_size=IMAGE_PX, max_text_tokens=64, item_fields='title,text')
        t0 = time.perf_counter()
        model, processor = load_mllm(cfg)
        sync()
        t_load = time.perf_counter() - t0
        log(f'loaded through tpad.mllm.load_mllm in {t_load:.1f} s: {type(model).__name__}, {type(processor).__name__}, '
            f'{next(model.parameters()).dtype}, attention {model.config._attn_implementation}')

        # --- plain: pre-processed batches, already on the device -------------------------------------------------
        t0 = time.perf_counter()
        batches, masks = [], []
        for s in range(0, n, batch):
            prompts = [item_prompt(r, processor, cfg) for r in items.iloc[s:s + batch].to_dict('records')]
            enc = processor(text=[p.text for p in prompts], images=[im for p in prompts for im in p.images],
                            padding=True, return_tensors='pt')
            masks.append(enc['attention_mask'])
            batches.append({k: v.to(device) for k, v in enc.items()})
        t_prep = time.perf_counter() - t0
        prep_ms = 1000 * t_prep / n  # serial prompt building + processor, per item
        lengths = [int(m.sum(1).float().mean()) for m in masks]
        image_tokens = int((batches[0]['input_ids'][0] == processor.image_token_id).sum())
        text_tokens = [len(processor.tokenizer(f"{r['title']}. {r['text']}", add_special_tokens=False)['input_ids'])
                       for r in items.head(256).to_dict('records')]
        log(f'plain batches pre-processed in {t_prep:.1f} s (not timed): {len(batches)} x {batch}, '
            f'{image_tokens} image tokens/item, text tokens/item {np.mean(text_tokens):.1f} '
            f'({min(text_tokens)}-{max(text_tokens)}), prompt tokens/item {np.mean(lengths):.1f}')

        def plain():
            for b in batches: model(**b, output_hidden_states=True)

        with torch.inference_mode():
            model(**batches[0], output_hidden_states=True)  # warm-up
            sync()
            if cuda: torch.cuda.reset_peak_memory_stats()
            plain_times = timed_repeats(plain, args.repeats, sync)
        plain_peak = torch.cuda.max_memory_allocated() if cuda else None
        plain_ips = [n / t for t in plain_times]
        log(f'plain forward: {max(plain_ips):.1f} items/s best, {statistics.median(plain_ips):.1f} median '
            f'({args.repeats} x {n} items); serial CPU preprocessing {prep_ms:.1f} ms/item, so keeping up needs '
            f'>= {math.ceil(max(plain_ips) * prep_ms / 1000)} worker(s)')

        # --- kit: item_features end to end ----------------------------------------------------------------------
        workers, why = pick_workers(args.workers, batch, device)
        del batches
        gc.collect()
        if cuda: torch.cuda.empty_cache()
        records = items.to_dict('records')
        try: item_features(model, processor, records[:batch], cfg, batch_size=batch, num_workers=workers)  # warm-up
        except RuntimeError as e:  # e.g. a worker killed by a bus error when /dev/shm is too small
            if not workers or 'DataLoader worker' not in str(e): raise
            workers, why = 0, f'{workers} workers failed ({str(e).splitlines()[0][:120]}): in the main process'
            log(why)
            item_features(model, processor, records[:batch], cfg, batch_size=batch, num_workers=0)
        if cuda: torch.cuda.reset_peak_memory_stats()
        out, report = {}, Report()
        def kit():
            out['h'] = item_features(model, processor, items, cfg, batch_size=batch, num_workers=workers, report=report)
        kit_times = timed_repeats(kit, args.repeats, sync)
        kit_peak = torch.cuda.max_memory_allocated() if cuda else None
        kit_ips = [n / t for t in kit_times]
        h = out['h']
        assert h.shape == (n, model.config.text_config.hidden_size) and torch.isfinite(h).all(), h.shape
        est = sorted(prompt_lengths(items, processor, cfg), reverse=True)  # the kit's batches: longest prompts first
        kit_padding = 1 - sum(est) / sum(max(est[s:s + batch]) * len(est[s:s + batch]) for s in range(0, n, batch))
        log(f'kit item_features ({workers} workers: {why}): {max(kit_ips):.1f} items/s best, '
            f'{statistics.median(kit_ips):.1f} median')
        ratio = statistics.median(kit_ips) / statistics.median(plain_ips)
        result = dict(
            bench='gpu_extract', shapes=shape, shape_config=SHAPES[shape], device=device,
            device_name=torch.cuda.get_device_name() if cuda else cpu_name(),
            dtype=dtype_name, attention='sdpa', items=n, batch=batch, repeats=args.repeats,
            image_px=IMAGE_PX, image_tokens_per_item=image_tokens, text_tokens_per_item=float(np.mean(text_tokens)),
            prompt_tokens_per_item=float(np.mean(lengths)),
            padded_share=dict(plain=padded_share(masks), kit_estimated=kit_padding),
            parameters=made['parameters'], tokenizer_tokens=made['tokenizer_tokens'],
            seconds=dict(build=made['build_s'], save=made['save_s'], load=t_load, plain_preprocess=t_prep),
            preprocess_ms_per_item=prep_ms, workers_to_keep_up=math.ceil(max(plain_ips) * prep_ms / 1000),
            plain=dict(items_per_s_best=max(plain_ips), items_per_s_median=statistics.median(plain_ips),
                       runs_s=plain_times, peak_gpu_gb=plain_peak / 1e9 if plain_peak else None),
            kit=dict(items_per_s_best=max(kit_ips), items_per_s_median=statistics.median(kit_ips), runs_s=kit_times,
                     peak_gpu_gb=kit_peak / 1e9 if kit_peak else None, num_workers=workers, workers_why=why),
            ratio_kit_over_plain=ratio, target_ratio=0.9, meets_target=ratio >= 0.9,
            reference_plain_items_per_s=dict(h100_2b=275, h100_7b=159).get(f'h100_{shape}'),
            machine=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                         cpus=os.cpu_count(), shm_free_gb=(shm_free_bytes() or 0) / 1e9, platform=platform.platform()),
            when=time.strftime('%Y-%m-%dT%H:%M:%S'))
        log(f'ratio kit/plain (medians): {ratio:.3f}  (target >= 0.9)')
        del model
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available(): torch.cuda.empty_cache()
        except Exception: pass


def summary_table(results: list) -> str:
    head = ('| shapes | device | plain items/s (median) | kit items/s (median) | kit/plain | reference plain | '
            'peak GB plain / kit | workers |\n|---|---|---|---|---|---|---|---|')
    rows = []
    for r in results:
        peak = '/'.join(f"{r[k]['peak_gpu_gb']:.1f}" if r[k]['peak_gpu_gb'] else '-' for k in ('plain', 'kit'))
        rows.append(f"| {r['shapes']} | {r['device_name']} | {r['plain']['items_per_s_median']:.1f} | "
                    f"{r['kit']['items_per_s_median']:.1f} | {r['ratio_kit_over_plain']:.3f} | "
                    f"{r['reference_plain_items_per_s'] or '-'} | {peak} | {r['kit']['num_workers']} |")
    return '\n'.join([head, *rows])


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.splitlines()[1:]))
    p.add_argument('--shapes', action='append', choices=sorted(SHAPES), help='model shapes; repeat for several (default: 2b)')
    p.add_argument('--device', default=None, help="'cuda', 'cuda:N' or 'cpu' (default: cuda when available)")
    p.add_argument('--dtype', default=None, choices=['bfloat16', 'float32'], help='default: bfloat16 on CUDA, float32 on CPU')
    p.add_argument('--items', type=int, default=None, help='items per timed repeat (default: 2b 2048, 7b 1024, tiny 64)')
    p.add_argument('--batch', type=int, default=None, help='batch size of both paths (default: 128; tiny: 16)')
    p.add_argument('--repeats', type=int, default=3, help='timed repeats of each path (after a warm-up)')
    p.add_argument('--workers', type=int, default=None, help='DataLoader workers of the kit (default: min(8, cores-2) on CUDA, 0 on CPU)')
    p.add_argument('--workdir', default=None, help='where the temporary model folder goes (default: the system temp dir; needs ~5 GB for 2b, ~17 GB for 7b)')
    p.add_argument('--out', type=Path, default=None, help='folder for the JSON (default: $OUT, else bench/results)')
    p.add_argument('--summary', type=Path, default=None, help='print the table of the gpu_extract JSON files in this folder and exit')
    p.add_argument('--allow-cpu', action='store_true', help='let the 2b/7b shapes run on a CPU (slow; 9 / 33 GB of float32 weights)')
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` -> SystemExit, so the temporary folder is removed
    if args.summary is not None:
        results = [json.loads(f.read_text()) for f in sorted(args.summary.glob('gpu_extract-*.json'))]
        print(summary_table(results) if results else f'no gpu_extract-*.json in {args.summary}')
        return results
    out = args.out or (Path(os.environ['OUT']) if os.environ.get('OUT') else ROOT / 'bench' / 'results')
    out.mkdir(parents=True, exist_ok=True)
    import torch
    on_cpu = (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cpu')
    if on_cpu and set(args.shapes or ['2b']) - {'tiny'} and not args.allow_cpu:
        p.error('no CUDA device: only --shapes tiny runs on a CPU (or pass --allow-cpu)')
    results = []
    for shape in args.shapes or ['2b']:
        r = run_shape(shape, args)
        path = out / f"gpu_extract-{shape}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(r, indent=2) + '\n')
        print(f'[{shape}] wrote {path}', flush=True)
        results.append(r)
    print(summary_table(results))
    return results


if __name__ == '__main__':
    main()
