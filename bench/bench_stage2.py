"""Stage 2a (the Transfer-MLLM) on the toyshop with the kit's tiny default MLLM: training steps/s, h^T extraction
items/s, wall time of the whole of `tpad.stage2.stage2`.

    python bench/bench_stage2.py [--epochs 2] [--samples 3000] [--batch-size 32] [--threads N]

Stage 1 runs first (untimed here, see bench_stage1.py) so that Stage 2 starts from the knowledge model as in the
notebook. Prints the numbers and writes JSON to bench/results/.
"""
import argparse, json, os, platform, tempfile, time
from pathlib import Path

import torch

from tpad.data import load
from tpad.preprocess import preprocess
from tpad.stage1 import stage1, tiny_stage1_config
from tpad.stage2 import stage2, tiny_stage2_config, transfer_features


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=2, help='Stage 2 epochs (the demo default is 2)')
    ap.add_argument('--samples', type=int, default=3000, help='training samples (max_train_samples; 0 = all 15k)')
    ap.add_argument('--batch-size', type=int, default=32, help='training batch size')
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default)')
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    shop = load('toyshop')
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        s1 = stage1(shop, tiny_stage1_config(tmp / 'stage1', tmp / 'cache'), log=lambda *a: None)
        config = tiny_stage2_config(tmp / 'stage2', tmp / 'cache', epochs=args.epochs, max_train_samples=args.samples)
        config.train.batch_size = args.batch_size
        t0 = time.perf_counter()
        prepared = preprocess(shop)
        out = stage2(shop, config, s1.model, s1.processor, prepared, log=lambda *a: None)
        total = time.perf_counter() - t0
        (tmp / 'cache' / 'h_T.json').unlink()  # force a fresh extraction
        t1 = time.perf_counter()
        transfer_features(out.model, out.processor, shop.items, config, log=lambda *a: None)
        extract_s = time.perf_counter() - t1
    n = out.train.step * args.batch_size
    result = dict(
        machine=f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, '
                f'{torch.get_num_threads()} threads',
        epochs=args.epochs, train_samples=args.samples, batch_size=args.batch_size,
        max_session_items=config.mllm.max_session_items, steps=out.train.step,
        train_seconds=round(out.train.seconds, 2), steps_per_s=round(out.train.step / out.train.seconds, 2),
        samples_per_s=round(n / out.train.seconds, 1),
        extract_items=len(shop.items), extract_seconds=round(extract_s, 3),
        extract_items_per_s=round(len(shop.items) / extract_s, 1),
        stage2_wall_seconds=round(total, 1),
        final_loss=round(float(out.train.frame().loss.dropna().iloc[-1]), 4))
    for k, v in result.items(): print(f'{k:>20}: {v}')
    out_dir = Path(__file__).parent / 'results'; out_dir.mkdir(exist_ok=True)
    (out_dir / 'bench_stage2.json').write_text(json.dumps(result, indent=2))
    print(f'wrote {out_dir / "bench_stage2.json"}')


if __name__ == '__main__': main()
