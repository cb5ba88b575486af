"""A user's dataset with no recipe: the derived defaults against DeiT's and against the best shipped recipe.

Each dataset is written once as an image folder (``DIR/train/<class>/*.png``, ``DIR/val/<class>/*.png``),
as a user's own would be, so that ``refiner train --data DIR`` treats it as a dataset it knows nothing
of. Then, for each seed and the same model, image size and epochs, three runs of the command line:

- ``derived``: ``refiner train --data DIR`` with no recipe (values derived from the run's size);
- ``deit``: the same with ``--config deit`` (DeiT's ImageNet values, the old default);
- ``recipe``: the same with the dataset's shipped recipe (``--config default`` for the digits, ...).

    OMP_NUM_THREADS=1 python scripts/derived_defaults.py --out runs/derived-defaults \\
        --json docs/derived_defaults.json

Finished runs in --out are kept, interrupted ones resumed. Writes the JSON and prints a markdown table.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from refiner.data import build_datasets

# name: (--data spec, train fraction, shipped recipe, img size, epochs)
DATASETS = {
    'digits': ('digits', 1.0, 'default', 16, 40),
    'digits_clutter': ('digits_clutter', 1.0, 'digits_clutter', 32, 40),
    'fashion_mnist_10': ('fashion_mnist', 0.1, 'fashion_mnist', 28, 10),
    'fashion_mnist': ('fashion_mnist', 1.0, 'fashion_mnist', 28, 2),  # 1,874 steps: about 40 CPU-minutes a run
}
ARMS = ('derived', 'deit', 'recipe')


def write_folder(name: str, root: Path) -> Path:
    """The dataset as an image folder under ``root/name`` (written once; a finished folder has .done)."""
    spec, fraction, *_ = DATASETS[name]
    folder = root / name
    if (folder / '.done').is_file():
        return folder
    data = build_datasets(spec, fraction, 0)
    for split, ds in (('train', data.train), ('val', data.val)):
        for i in range(len(ds)):
            img, target, _ = ds.load(i)
            out = folder / split / data.classes[target].replace('/', '-') / f'{i:05d}.png'
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(img.convert('L'))).save(out)
    (folder / '.done').write_text('')
    return folder


def run(arm: str, name: str, folder: Path, seed: int, out: Path) -> dict:
    """One run of the command line, resumed when it was interrupted; its summary."""
    _, _, recipe, img_size, epochs = DATASETS[name]
    if not (out / 'summary.json').is_file():
        cmd = [sys.executable, '-m', 'refiner', 'train', '--no-progress']
        if (out / 'config.yaml').is_file():
            cmd += ['--resume', str(out)]
        else:
            cmd += ['--data', str(folder), '--model', 'refiner_vit_nano', '--img-size', str(img_size),
                    '--epochs', str(epochs), '--seed', str(seed), '--out', str(out),
                    '--set', f'eval_every={epochs}']
            cmd += {'derived': [], 'deit': ['--config', 'deit'], 'recipe': ['--config', recipe]}[arm]
        print(' '.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((out / 'summary.json').read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--datasets', nargs='+', default=list(DATASETS), choices=list(DATASETS))
    p.add_argument('--arms', nargs='+', default=list(ARMS), choices=list(ARMS), help='in this order')
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--out', type=Path, default=Path('runs/derived-defaults'))
    p.add_argument('--json', type=Path, help='write the results here (default: OUT/derived_defaults.json)')
    args = p.parse_args()
    results = {}
    for name in args.datasets:
        folder = write_folder(name, args.out / 'data')
        for seed in args.seeds:
            for arm in args.arms:
                summary = run(arm, name, folder, seed, args.out / f'{name}-{arm}-s{seed}')
                results.setdefault(name, {}).setdefault(arm, []).append(
                    {'seed': seed, 'top1': summary['top1'], 'ema_top1': summary.get('ema_top1'),
                     'train_time_s': summary['train_time_s'], 'steps': summary['steps']})
    target = args.json or args.out / 'derived_defaults.json'
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({'datasets': {k: DATASETS[k] for k in results}, 'results': results}, indent=2) + '\n')
    print('| dataset | epochs | ' + ' | '.join(args.arms) + ' |\n|' + ' --- |' * (len(args.arms) + 2))
    for name, arms in results.items():
        cells = []
        for arm in args.arms:
            top1 = [r['top1'] for r in arms[arm]]
            spread = f' ± {statistics.stdev(top1):.2f}' if len(top1) > 1 else ''
            cells.append(f'{statistics.mean(top1):.2f}{spread} (n={len(top1)})')
        print(f'| {name} | {DATASETS[name][4]} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
