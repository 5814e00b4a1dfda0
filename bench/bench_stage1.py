"""Stage 1 on the toyshop with the kit's tiny default MLLM: training steps/s, extraction items/s, wall time.

    python bench/bench_stage1.py [--epochs 8] [--batch-size 16] [--threads N]

Times the real path (`tpad.stage1.stage1`: load the tiny MLLM, train the knowledge adapter, extract h^K for all 600
items), then extraction alone again with a warm model. Prints the numbers and writes JSON to bench/results/.
"""
import argparse, json, os, platform, tempfile, time
from pathlib import Path

import torch

from tpad.data import load
from tpad.mllm import item_features
from tpad.stage1 import stage1, tiny_mllm_config, tiny_stage1_config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=8, help='Stage 1 epochs (the demo default is 8)')
    ap.add_argument('--batch-size', type=int, default=16, help='training batch size')
    ap.add_argument('--extract-batch-size', type=int, default=32, help='extraction batch size')
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default)')
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    shop = load('toyshop')
    with tempfile.TemporaryDirectory() as tmp:
        config, mllm = tiny_stage1_config(epochs=args.epochs), tiny_mllm_config()
        config.train.batch_size, config.extract_batch_size = args.batch_size, args.extract_batch_size
        t0 = time.perf_counter()
        out = stage1(shop, config, mllm, Path(tmp) / 'stage1', Path(tmp) / 'cache', log=lambda *a: None)
        total = time.perf_counter() - t0
        train_s = out.train.seconds
        t1 = time.perf_counter()
        feats = item_features(out.model, out.processor, shop.items, mllm, batch_size=config.extract_batch_size,
                              adapter='knowledge')
        extract_s = time.perf_counter() - t1
    n_train = len(shop.items) - round(config.holdout_share * len(shop.items))
    result = dict(
        machine=f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, '
                f'{torch.get_num_threads()} threads',
        epochs=args.epochs, train_items=n_train, batch_size=args.batch_size, steps=out.train.step,
        train_seconds=round(train_s, 2), steps_per_s=round(out.train.step / train_s, 2),
        train_items_per_s=round(n_train * args.epochs / train_s, 1),
        extract_items=len(shop.items), extract_seconds=round(extract_s, 3),
        extract_items_per_s=round(len(shop.items) / extract_s, 1),
        stage1_wall_seconds=round(total, 1), final_loss=round(float(out.train.frame().loss.dropna().iloc[-1]), 4),
        feature_dim=int(feats.shape[1]))
    for k, v in result.items(): print(f'{k:>20}: {v}')
    out_dir = Path(__file__).parent / 'results'; out_dir.mkdir(exist_ok=True)
    (out_dir / 'bench_stage1.json').write_text(json.dumps(result, indent=2))
    print(f'wrote {out_dir / "bench_stage1.json"}')


if __name__ == '__main__': main()
