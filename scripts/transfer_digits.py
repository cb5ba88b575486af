"""Transfer on the embedded digits: does pretraining on some classes help to learn others from few images?

Pretrains refiner_vit_nano on digits 0-4 (all their training images, the default recipe), then
learns digits 5-9 from a small stratified fraction of their training images in three ways, each
with the same recipe, steps and seeds: from scratch, fine-tuned from the pretrained weights, and
a linear probe of them (only the classifier trains, at 10x the learning rate). Top-1 is measured
on the 5-9 held-out images (224), which no run trains on.

    python scripts/transfer_digits.py                    # ~10 min on 2 CPU cores; resumable
    python scripts/transfer_digits.py --fractions 0.05 --seeds 0

Finished runs in --out are reused. Writes OUT/transfer.json and prints a markdown table.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

from refiner.config import apply_overrides, load_recipe
from refiner.train import train

PRETRAIN_CLASSES = ['0', '1', '2', '3', '4']
TARGET_CLASSES = ['5', '6', '7', '8', '9']


def _run(out: Path, overrides: dict) -> dict:
    """Train one run into ``out`` unless it already finished; its summary."""
    if (out / 'summary.json').is_file():
        return json.loads((out / 'summary.json').read_text())
    base = load_recipe('default')
    if overrides.get('finetune'):  # the architecture comes from the pretrained run
        base = {k: v for k, v in base.items() if k not in ('model', 'model_args')}
        base['model'] = None
    cfg = apply_overrides(base, overrides)
    resume = str(out) if (out / 'checkpoint.pt').is_file() else None
    return train(cfg, out=None if resume else str(out), resume=resume, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='runs/transfer')
    p.add_argument('--fractions', type=float, nargs='+', default=[0.05, 0.2])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=40, help='epochs of every downstream run (the budget)')
    p.add_argument('--batch-size', type=int, default=16, help='batch of the downstream runs')
    args = p.parse_args()
    root = Path(args.out)
    t0 = time.time()
    pre = root / 'pretrain-0to4'
    pre_summary = _run(pre, dict(classes=PRETRAIN_CLASSES, seed=0))
    print(f'pretrained on digits 0-4: top-1 {pre_summary["top1"]:.2f}% on their held-out images', flush=True)
    arms = {
        'scratch': {},
        'finetune': dict(finetune=str(pre)),
        'linear_probe': dict(finetune=str(pre), linear_probe=True),
    }
    rows = []
    for fraction in args.fractions:
        for arm, extra in arms.items():
            results = []
            for seed in args.seeds:
                lr = load_recipe('default')['lr'] * (10 if arm == 'linear_probe' else 1)
                summary = _run(root / f'{arm}-f{fraction}-s{seed}', dict(
                    classes=TARGET_CLASSES, train_fraction=fraction, seed=seed, epochs=args.epochs,
                    batch_size=args.batch_size, eval_every=args.epochs, lr=lr, **extra))
                results.append(summary)
                print(f'{arm:>12} fraction {fraction} seed {seed}: top-1 {summary["top1"]:.2f}%'
                      + (f' (from {summary["start_top1"]:.2f}% at epoch 0)' if 'start_top1' in summary else ''),
                      flush=True)
            top1 = [r['top1'] for r in results]
            rows.append({'arm': arm, 'fraction': fraction, 'train_images': results[0]['num_train'],
                         'seeds': args.seeds, 'top1': top1, 'mean': statistics.mean(top1),
                         'std': statistics.stdev(top1) if len(top1) > 1 else 0.0,
                         'start_top1': [r.get('start_top1') for r in results]})
    report = {'pretrain': {'classes': PRETRAIN_CLASSES, 'top1': pre_summary['top1'],
                           'num_train': pre_summary['num_train']},
              'target_classes': TARGET_CLASSES, 'epochs': args.epochs, 'batch_size': args.batch_size,
              'rows': rows, 'wall_time_s': time.time() - t0}
    (root / 'transfer.json').write_text(json.dumps(report, indent=2) + '\n')
    print('\n| training images of 5-9 | from scratch | fine-tuned from 0-4 | linear probe of 0-4 |')
    print('| --- | --- | --- | --- |')
    for fraction in args.fractions:
        cells = {r['arm']: r for r in rows if r['fraction'] == fraction}
        n = cells['scratch']['train_images']
        print(f'| {n} ({fraction:.0%}) | ' + ' | '.join(
            f'{cells[a]["mean"]:.2f} ± {cells[a]["std"]:.2f}%' for a in arms) + ' |')
    print(f'\nresults: {root / "transfer.json"} ({report["wall_time_s"] / 60:.1f} min)')


if __name__ == '__main__':
    main()
