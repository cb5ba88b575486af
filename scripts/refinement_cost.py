"""What refinement costs: a Refiner model as it is, and with refinement made free.

The second variant keeps everything but the refinement: its refining blocks aggregate their V with
the handed-over map as it is (A @ v) instead of s·BN(DLA(A)). That is the floor no refinement kernel
can go below, so its ratio to the reference model bounds what any speed-up of refinement can reach.
The three models (reference, model, model without refinement) run in alternating fresh processes,
as in ``refiner bench``, and the figures are medians over rounds of each process's median step.

    python scripts/refinement_cost.py --mode train --rounds 3 --out docs/refinement_cost_train.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from refiner.bench import BenchConfig, measure


def _measure_child(cfg: BenchConfig, free_refinement: bool) -> None:
    if free_refinement:
        from refiner.layers.attention import RefinedAttention
        RefinedAttention._aggregate_refined = lambda self, attn, v, grid_size=None: attn @ v
    print('BENCH' + json.dumps(measure(cfg)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='refiner_vit_s')
    parser.add_argument('--reference', default='deit_small_patch16_224')
    parser.add_argument('--mode', choices=('infer', 'train'), default='train')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cfg, free = json.loads(args.child)
        _measure_child(BenchConfig(**cfg), free)
        return
    variants = [(args.reference, False), (args.model, False), (args.model, True)]
    names = [args.reference, args.model, f'{args.model} without refinement (A @ v)']
    steps = {name: [] for name in names}
    for r in range(args.rounds):
        for name, (model, free) in zip(names, variants):
            cfg = BenchConfig(model=model, mode=args.mode, batch_size=args.batch_size, img_size=args.img_size,
                              steps=args.steps, warmup=args.warmup)
            res = subprocess.run([sys.executable, __file__, '--child', json.dumps([asdict(cfg), free])],
                                 capture_output=True, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
            line = next((s for s in res.stdout.splitlines() if s.startswith('BENCH')), None)
            if line is None:
                sys.exit(f'{name} failed:\n{res.stderr[-2000:]}')
            m = json.loads(line[5:])
            steps[name].append(m['median_step_s'])
            print(f'round {r + 1}/{args.rounds}: {name}: {m["median_step_s"]:.3f} s per step', file=sys.stderr)
    ref = statistics.median(steps[args.reference])
    rows = [{'model': name, 'median_step_s': statistics.median(s), 'round_step_s': s,
             'images_per_s': args.batch_size / statistics.median(s), 'speed_ratio': ref / statistics.median(s)}
            for name, s in steps.items()]
    print(f'| model ({args.mode}, batch {args.batch_size}, {args.img_size}²) | s per step | images/s | × reference |')
    print('| --- | --- | --- | --- |')
    for row in rows:
        print(f'| {row["model"]} | {row["median_step_s"]:.2f} | {row["images_per_s"]:.2f} | {row["speed_ratio"]:.2f} |')
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ('out', 'child')}
        Path(args.out).write_text(json.dumps({'config': config, 'rows': rows}, indent=2) + '\n')


if __name__ == '__main__':
    main()
