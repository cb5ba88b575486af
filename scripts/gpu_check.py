"""CUDA checks and the GPU benchmark, in one short run on a machine with an NVIDIA GPU.

    PYTHONPATH=src python scripts/gpu_check.py --out DIR

1. the original model's parity fixtures on CUDA (float32);
2. the training kernels against the reference autograd code on CUDA (float64 and float32);
3. a bf16-autocast training step of Refiner-ViT-S (finite loss and gradients);
4. ``refiner bench`` on CUDA: Refiner-ViT-S against timm's deit_small_patch16_224, bf16 autocast,
   batch 64 and 128, inference and training, alternating fresh processes.
Writes gpu_check.json (and bench.json) to --out.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src'))
import refiner  # noqa: E402
from refiner.bench import BenchConfig, format_table, run_bench  # noqa: E402
from refiner.kernels import set_kernels  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = (torch.rand(n, generator=g) + .5).to(m.weight)
            m.bias.data = (torch.rand(n, generator=g) * .6 - .3).to(m.bias)
            m.running_mean.data = (torch.rand(n, generator=g) * .2).to(m.running_mean)
            m.running_var.data = (torch.rand(n, generator=g) + .5).to(m.running_var)
    return model


def kernels_vs_reference(dtype, device):
    torch.manual_seed(0)
    model = randomise(timm.create_model('refiner_vit_nano', num_classes=5)).to(device, dtype)
    ref = copy.deepcopy(model)
    set_kernels(False, ref)
    x = torch.randn(6, 3, 32, 32, device=device, dtype=dtype)
    o1, o2 = model(x), ref(x)
    o1.square().sum().backward()
    o2.square().sum().backward()
    grad_err = max(rel(p1.grad, p2.grad) for p1, p2 in zip(model.parameters(), ref.parameters())
                   if p2.grad.abs().max() > 1e-6)
    return {'output_rel_diff': rel(o1, o2), 'max_grad_rel_diff': grad_err}


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', default='gpu_check')
    p.add_argument('--device', default='cuda')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--batch-size', type=int, nargs='+', default=[64, 128])
    p.add_argument('--skip-bench', action='store_true')
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    res = {'torch': torch.__version__, 'timm': timm.__version__,
           'device': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}
    print(res, flush=True)

    fixtures = Path(__file__).resolve().parents[1] / 'tests' / 'data'
    for name in ('official_tiny', 'official_tiny_dense'):
        fx = torch.load(fixtures / f'{name}.pt', weights_only=True)
        model = refiner.load_official(fx['state_dict'], device=dev)
        with torch.no_grad():
            res[f'parity_{name}'] = rel(model(fx['input'].to(dev)).cpu(), fx['logits'])
    res['kernels_vs_reference_float64'] = kernels_vs_reference(torch.float64, dev)
    res['kernels_vs_reference_float32'] = kernels_vs_reference(torch.float32, dev)
    print(json.dumps(res, indent=1), flush=True)

    model = timm.create_model('refiner_vit_s').to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (64,), device=dev)
    t = time.time()
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    res['bf16_train_step'] = {'loss': float(loss), 'grads_finite': all(torch.isfinite(p.grad).all().item()
                                                                        for p in model.parameters()),
                              'seconds_first_step': time.time() - t}
    del model, opt
    print(json.dumps(res['bf16_train_step']), flush=True)

    if not args.skip_bench:
        configs = [BenchConfig('refiner_vit_s', mode, b, 224, device=args.device, amp='bf16', steps=10, warmup=3)
                   for mode in ('infer', 'train') for b in args.batch_size]
        report = run_bench(configs, 'deit_small_patch16_224', rounds=args.rounds)
        (out / 'bench.json').write_text(json.dumps(report, indent=2))
        print(format_table(report), flush=True)
        res['bench_table'] = format_table(report)
    (out / 'gpu_check.json').write_text(json.dumps(res, indent=2))


if __name__ == '__main__':
    main()
