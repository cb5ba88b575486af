"""Transfer on the embedded digits: does pretraining on some classes help to learn others from few images?

Pretrains refiner_vit_nano on some digits (0-4 by default; all their training images, the default
recipe), then learns the others (5-9) from a small stratified fraction of their training images,
with the same seeds: from scratch (the default recipe), fine-tuned from the pretrained weights,
and a linear probe of them (only the classifier trains, at 10x the learning rate). Top-1 is
measured on the target classes' held-out images, which no run trains on.

By default every arm runs the default recipe with the same steps (--epochs, --batch-size). With
--finetune-config NAME the fine-tuned arm runs that recipe as shipped instead (its epochs,
learning rate and scaling rule, augmentation; only --batch-size is set): what a user of
``refiner train --config finetune`` gets, measured against training from scratch.

    python scripts/transfer_digits.py                    # ~10 min on 2 CPU cores; resumable
    python scripts/transfer_digits.py --fractions 0.05 --seeds 0
    python scripts/transfer_digits.py --pretrain-classes 0 2 4 6 8 --target-classes 1 3 5 7 9 \\
        --fractions 0.05 0.2 1.0 --seeds 0 1 --finetune-config finetune --arms scratch finetune \\
        --out runs/transfer-evens --json docs/transfer_finetune_defaults.json

Finished runs in --out are reused. Writes the JSON (default OUT/transfer.json) and prints a
markdown table. On a shared machine, OMP_NUM_THREADS=1 avoids OpenMP threads spinning against
other processes (10x faster there).
"""
import argparse
import json
import statistics
import time
from pathlib import Path

from refiner.config import apply_overrides, load_recipe
from refiner.train import train

ARMS = ('scratch', 'finetune', 'linear_probe')
HEADERS = {'scratch': 'from scratch', 'finetune': 'fine-tuned', 'linear_probe': 'linear probe'}


def _run(out: Path, overrides: dict, recipe: str = 'default') -> dict:
    """Train one run of ``recipe`` into ``out`` unless it already finished; its summary."""
    if not (out / 'summary.json').is_file():
        _train(out, overrides, recipe)
    last = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    return {**json.loads((out / 'summary.json').read_text()), 'wall_time_s': last['wall_time_s']}


def _train(out: Path, overrides: dict, recipe: str) -> None:
    base = load_recipe(recipe)
    if overrides.get('finetune'):  # the architecture comes from the pretrained run
        base = {k: v for k, v in base.items() if k not in ('model', 'model_args')}
        base['model'] = None
    cfg = apply_overrides(base, overrides)
    resume = str(out) if (out / 'checkpoint.pt').is_file() else None
    train(cfg, out=None if resume else str(out), resume=resume, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='runs/transfer')
    p.add_argument('--pretrain-classes', nargs='+', default=['0', '1', '2', '3', '4'])
    p.add_argument('--target-classes', nargs='+', default=['5', '6', '7', '8', '9'])
    p.add_argument('--fractions', type=float, nargs='+', default=[0.05, 0.2])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--arms', nargs='+', choices=ARMS, default=list(ARMS))
    p.add_argument('--epochs', type=int, default=40, help='epochs of every downstream run (the budget)')
    p.add_argument('--batch-size', type=int, default=16, help='batch of the downstream runs')
    p.add_argument('--finetune-config', metavar='RECIPE',
                   help='fine-tune with this recipe as shipped (its epochs, lr, augmentation) instead of the '
                        "scratch arm's settings")
    p.add_argument('--json', help='where to write the results (default: OUT/transfer.json)')
    args = p.parse_args()
    root = Path(args.out)
    pre_name, target_name = _name(args.pretrain_classes), _name(args.target_classes)
    t0 = time.time()
    pre = root / f'pretrain-{"".join(args.pretrain_classes)}'
    pre_summary = _run(pre, dict(classes=args.pretrain_classes, seed=0))
    print(f'pretrained on digits {pre_name}: top-1 {pre_summary["top1"]:.2f}% on their held-out images', flush=True)
    default_lr = load_recipe('default')['lr']
    same_steps = dict(epochs=args.epochs, eval_every=args.epochs)
    arms = {
        'scratch': ('default', dict(lr=default_lr, **same_steps)),
        'finetune': (args.finetune_config, dict(finetune=str(pre), eval_every=1000)) if args.finetune_config
        else ('default', dict(finetune=str(pre), lr=default_lr, **same_steps)),
        'linear_probe': ('default', dict(finetune=str(pre), linear_probe=True, lr=default_lr * 10, **same_steps)),
    }
    arms = {a: arms[a] for a in args.arms}
    rows = []
    for fraction in args.fractions:
        for arm, (recipe, extra) in arms.items():
            results = []
            for seed in args.seeds:
                summary = _run(root / f'{arm}-f{fraction}-s{seed}', dict(
                    classes=args.target_classes, train_fraction=fraction, seed=seed, batch_size=args.batch_size,
                    **extra), recipe)
                results.append(summary)
                print(f'{arm:>12} fraction {fraction} seed {seed}: top-1 {summary["top1"]:.2f}%'
                      + (f' (from {summary["start_top1"]:.2f}% at epoch 0)' if 'start_top1' in summary else ''),
                      flush=True)
            top1 = [r['top1'] for r in results]
            rows.append({'arm': arm, 'recipe': recipe, 'fraction': fraction, 'train_images': results[0]['num_train'],
                         'epochs': results[0]['epochs'], 'seeds': args.seeds, 'top1': top1,
                         'mean': statistics.mean(top1), 'std': statistics.stdev(top1) if len(top1) > 1 else 0.0,
                         'start_top1': [r.get('start_top1') for r in results],
                         'wall_time_s': [r['wall_time_s'] for r in results]})
    report = {'pretrain': {'classes': args.pretrain_classes, 'top1': pre_summary['top1'],
                           'num_train': pre_summary['num_train']},
              'target_classes': args.target_classes, 'epochs': args.epochs, 'batch_size': args.batch_size,
              'finetune_config': args.finetune_config, 'rows': rows,
              'runs_wall_time_s': sum(sum(r['wall_time_s']) for r in rows),  # reused runs included
              'wall_time_s': time.time() - t0}
    out = Path(args.json) if args.json else root / 'transfer.json'
    out.write_text(json.dumps(report, indent=2) + '\n')
    print(f'\n| training images of {target_name} | '
          + ' | '.join(f'{HEADERS[a]}' + (f' from {pre_name}' if a != 'scratch' else '') for a in arms) + ' |')
    print('| --- ' * (len(arms) + 1) + '|')
    for fraction in args.fractions:
        cells = {r['arm']: r for r in rows if r['fraction'] == fraction}
        n = next(iter(cells.values()))['train_images']
        print(f'| {n} ({fraction:.0%}) | ' + ' | '.join(
            f'{cells[a]["mean"]:.2f} ± {cells[a]["std"]:.2f}%' for a in arms) + ' |')
    print(f'\nresults: {out} ({report["runs_wall_time_s"] / 60:.1f} min of downstream runs, '
          f'{report["wall_time_s"] / 60:.1f} min in this call)')


def _name(classes: list) -> str:
    """0 1 2 3 4 as '0-4', other sets as '0,2,4,6,8'."""
    digits = [int(c) for c in classes]
    consecutive = digits == list(range(digits[0], digits[0] + len(digits)))
    return f'{digits[0]}-{digits[-1]}' if consecutive and len(digits) > 2 else ','.join(classes)


if __name__ == '__main__':
    main()
