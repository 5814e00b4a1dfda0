"""Stage 2 on the toyshop with the kit's tiny default MLLM: Stage 2a (the Transfer-MLLM: training steps/s, h^T
extraction items/s, wall time of `tpad.stage2.stage2`) and Stage 2b (alignment: `tpad.align.stage2b`, steps/s and
wall time), and the whole of Stage 2 (2a + 2b; target: under 5 minutes).

    python bench/bench_stage2.py [--epochs 2] [--samples 3000] [--batch-size 32] [--threads N]

Stage 1 runs first (untimed here, see bench_stage1.py) so that Stage 2 starts from the knowledge model as in the
notebook. Prints the numbers and writes JSON to bench/results/.
"""
import argparse, json, os, platform, tempfile, time
from pathlib import Path

import torch

from tpad.data import load
from tpad.preprocess import preprocess
from tpad.stage1 import stage1, tiny_mllm_config, tiny_stage1_config
from tpad.stage2 import stage2, tiny_stage2_config, transfer_features
from tpad.align import stage2b, tiny_align_config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=2, help='Stage 2 epochs (the demo default is 2)')
    ap.add_argument('--samples', type=int, default=3000, help='training samples (max_train_samples; 0 = all 15k)')
    ap.add_argument('--batch-size', type=int, default=32, help='training batch size')
    ap.add_argument('--align-epochs', type=int, default=6, help='Stage 2b epochs (the demo default is 6)')
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default)')
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    shop = load('toyshop')
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mllm = tiny_mllm_config()
        s1 = stage1(shop, tiny_stage1_config(), mllm, tmp / 'stage1', tmp / 'cache', log=lambda *a: None)
        knowledge = {k: v.clone() for k, v in s1.model.state_dict().items()}  # tiny model: one set of weights
        config = tiny_stage2_config(epochs=args.epochs, max_train_samples=args.samples)
        config.train.batch_size = args.batch_size
        t0 = time.perf_counter()
        prepared = preprocess(shop)
        out = stage2(shop, config, mllm, tmp / 'stage2', tmp / 'cache', s1.model, s1.processor, prepared, log=lambda *a: None)
        total = time.perf_counter() - t0
        (tmp / 'cache' / 'h_T.json').unlink()  # force a fresh extraction
        t1 = time.perf_counter()
        transfer_features(out.model, out.processor, shop.items, mllm, tmp / 'cache', log=lambda *a: None)
        extract_s = time.perf_counter() - t1
        out.model.load_state_dict(knowledge)  # Stage 2b's student is the Stage 1 model (see nbs/06_alignment)
        t2 = time.perf_counter()
        b = stage2b(out.model, out.processor, shop.items, s1.features, out.features,
                    tiny_align_config(epochs=args.align_epochs), tiny_stage1_config(), mllm, tmp / 'align', tmp / 'cache',
                    log=lambda *a: None)
        align_s = time.perf_counter() - t2
    n = out.train.step * args.batch_size
    result = dict(
        machine=f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, '
                f'{torch.get_num_threads()} threads',
        epochs=args.epochs, train_samples=args.samples, batch_size=args.batch_size,
        max_session_items=mllm.max_session_items, steps=out.train.step,
        train_seconds=round(out.train.seconds, 2), steps_per_s=round(out.train.step / out.train.seconds, 2),
        samples_per_s=round(n / out.train.seconds, 1),
        extract_items=len(shop.items), extract_seconds=round(extract_s, 3),
        extract_items_per_s=round(len(shop.items) / extract_s, 1),
        stage2_wall_seconds=round(total, 1),
        final_loss=round(float(out.train.frame().loss.dropna().iloc[-1]), 4),
        align_steps=b.train.step, align_train_seconds=round(b.train.seconds, 2),
        align_steps_per_s=round(b.train.step / b.train.seconds, 2), stage2b_wall_seconds=round(align_s, 1),
        stage2_total_seconds=round(total + align_s, 1),
        **{f'{k}_{when}': round(v, 3) for when, d in (('before', b.before), ('after', b.after)) for k, v in d.items() if k != 'items'})
    for k, v in result.items(): print(f'{k:>20}: {v}')
    out_dir = Path(__file__).parent / 'results'; out_dir.mkdir(exist_ok=True)
    (out_dir / 'bench_stage2.json').write_text(json.dumps(result, indent=2))
    print(f'wrote {out_dir / "bench_stage2.json"}')


if __name__ == '__main__': main()
