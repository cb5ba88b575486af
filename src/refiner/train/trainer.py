"""The training loop: one run built in a fixed order, trained step by step, checkpointed, evaluated, finished.

A checkpoint holds the model, EMA, optimizer, scheduler and loss-scaler states plus the counters
(epoch, batch within the epoch, step), and a run killed at any moment and resumed from its last
checkpoint replays the same batches with the same randomness: on CPU its final weights are
bit-identical to an uninterrupted run's. Only rank 0 writes.
"""
import dataclasses
import json
import math
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import RunFiles, load_state, save_state, save_weights
from ..config import TrainConfig, scaled_lr
from ..data import EpochSampler, SeededTransformDataset, SkipLog, collate_skipping
from ..defaults import EMA_REPORT_MAX_START_SHARE, ema_start_share
from ..devices import all_reduce
from ..evaluate import evaluate
from ..fileio import atomic_write_text
from ..pretrained import Source
from .distributed import Dist, gather_paths, seed_everything
from .objective import training_loss
from .setup import (
    TrainingError,
    build_input_pipeline,
    build_model,
    build_optimisation,
    build_precision,
    build_regularisers,
    check_can_start,
    derive_defaults,
    epochs_for_min_steps,
    from_source_run,
    read_data,
    resolve_img_size,
    resolve_preprocessing,
    wrap_step_module,
)

__all__ = ['Trainer', 'STATE_FORMAT', 'num_params', 'write_metrics']

STATE_FORMAT = 'refiner-train-state'  # checkpoint.pt's 'format'


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_metrics(files: RunFiles, history: List[Dict[str, Any]]) -> None:
    atomic_write_text(files.metrics, ''.join(json.dumps(h) + '\n' for h in history))


class Trainer:
    """One run: __init__ builds everything in a fixed order (the order of the random draws is part of
    the result), ``run`` trains to the end and writes the final files."""

    def __init__(self, cfg: TrainConfig, files: RunFiles, ddp: Dist, device: torch.device, resuming: bool,
                 progress: bool, source: Optional[Source] = None) -> None:
        self.files, self.ddp, self.device, self.progress = files, ddp, device, progress and ddp.main
        check_can_start(cfg, files, device, resuming)
        seed_everything(cfg.seed, -1)  # the model's initialisation (and any re-initialised head) draws from here
        cfg, self.from_source = from_source_run(cfg, source)

        self.data = read_data(cfg)
        self.num_classes = len(self.data.classes)
        img_size, size_from = resolve_img_size(cfg, self.data, source)
        global_batch = cfg.batch_size * ddp.world_size  # images per optimizer step, all ranks together
        self.derived_note = None
        if cfg.derive_keys and not resuming:  # a resume trains with the values config.yaml recorded
            cfg, self.derived_note = derive_defaults(cfg, self.data, img_size, global_batch)
        self.model, self.model_args, self.loaded = build_model(cfg, self.data.classes, img_size, source, device)
        if self.loaded:  # a new task may need another size than the source's: say which one is used and why
            self.loaded += f'; input {img_size}x{img_size} px ({size_from}; --img-size N to change it)'
        cfg, self.data_config = resolve_preprocessing(cfg, self.model, source, img_size)
        self.lr, rule, self.lr_note = scaled_lr(cfg, global_batch)
        cfg = dataclasses.replace(cfg, lr_base_scale=rule)  # a resume scales as this run did, whatever timm's rule
        self.train_set, self.val_set, self.sampler, self.val_sampler = build_input_pipeline(
            cfg, self.data, self.data_config, ddp, global_batch)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        cfg, self.epochs_note = epochs_for_min_steps(cfg, self.steps_per_epoch)
        self.cfg = cfg  # as config.yaml records it
        self.skips = SkipLog()

        self.optimizer, self.scheduler, self.total_epochs = build_optimisation(cfg, self.model, self.lr,
                                                                                self.steps_per_epoch)
        self.mixup, self.ema = build_regularisers(cfg, self.model, self.num_classes)
        self.scaler, self.autocast = build_precision(cfg, device)
        self.step_module = wrap_step_module(cfg, self.model, ddp, device)

        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0  # where the run stands; _load moves them on
        self.history: List[Dict[str, Any]] = []
        self._ema_settled = False  # the EMA is no longer mostly its starting weights (see _evaluate)
        if resuming:
            self._load()
        elif ddp.main:
            files.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(files.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        return {
            'format': STATE_FORMAT, 'version': 1,
            'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch, 'global_step': self.global_step,
            'model': self.model.state_dict(),
            'ema': self.ema.module.state_dict() if self.ema is not None else None,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'history': json.dumps(self.history),
            'skipped': sorted(self.skips.paths),
            'world_size': self.ddp.world_size,
        }

    def _save(self) -> None:
        if self.ddp.main:
            save_state(self._state(), self.files.state)

    def _load(self) -> None:
        state = load_state(self.files.state)
        if state.get('format') != STATE_FORMAT:
            raise TrainingError(f'{self.files.state} is not a refiner training state')
        if state['world_size'] != self.ddp.world_size:
            raise TrainingError(f'the run was trained with {state["world_size"]} process(es); resume it with the same '
                                f'number (got {self.ddp.world_size}) to keep the batches identical')
        self.model.load_state_dict(state['model'])
        if self.ema is not None and state['ema'] is not None:
            self.ema.module.load_state_dict(state['ema'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state['scaler'] is not None:
            self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.batch_in_epoch = state['epoch'], state['batch_in_epoch']
        self.global_step = state['global_step']
        self.history = json.loads(state['history'])
        self.skips.add(state['skipped'])
        if self.ddp.main:
            write_metrics(self.files, self.history)

    # -- loop -------------------------------------------------------------------------------
    def _loader(self, dataset: SeededTransformDataset, sampler: EpochSampler) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.workers,
                          collate_fn=collate_skipping, pin_memory=self.device.type == 'cuda', drop_last=False)

    def _loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        patch = self.model.patch_embed.patch_size if self.cfg.mix_token else None
        return training_loss(self.step_module, images, targets, self.cfg, self.num_classes, self.mixup,
                             self.autocast, patch)

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        cfg = self.cfg
        if images.shape[0] % 2 and self.mixup is not None:  # a skipped file left an odd batch
            images, targets = images[:-1], targets[:-1]
        seed_everything(cfg.seed, self.global_step, self.ddp.rank)
        self.model.train(not cfg.linear_probe)  # a linear probe's backbone stays in eval mode (BatchNorm frozen)
        loss = self._loss(images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))
        value = loss.item()  # the step's one synchronisation: the progress bar and the NaN check share it
        bad = not math.isfinite(value)
        if self.ddp.world_size > 1:  # every rank stops together
            bad = bool(all_reduce(torch.tensor([float(bad)], device=self.device)).item())
        if bad:
            raise TrainingError(
                f'the loss became {value} at step {self.global_step} (epoch {self.epoch + 1}); the run '
                f'stopped and kept its last good checkpoint in {self.files.state}. Lower --lr, enable clip_grad, '
                f'or check the data')
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
        self.global_step += 1
        self.scheduler.step_update(num_updates=self.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return value

    def run(self) -> Dict[str, Any]:
        cfg, files = self.cfg, self.files
        if self.epoch >= self.total_epochs:
            if files.summary.is_file():
                raise TrainingError(f'{files.root}: this run already finished; its results are in {files.summary}')
            if self.ddp.main:  # stopped after its last checkpoint, before its results were all written
                print(f'{files.root}: training had finished; writing its results', flush=True)
            return self._finish()
        if self.ddp.main:
            print(f'{cfg.model} ({num_params(self.model) / 1e6:.2f}M parameters) on {self.data.description}; '
                  f'{self.total_epochs} epochs x {self.steps_per_epoch} steps, batch {cfg.batch_size} x '
                  f'{self.ddp.world_size}, {self.device}' + (f', resuming at epoch {self.epoch + 1} step '
                                                             f'{self.global_step}' if self.global_step else '')
                  + f'; run directory {files.root}', flush=True)
            for note in (self.derived_note, self.lr_note, self.epochs_note):
                if note:
                    print(note, flush=True)
            for line in [self.loaded] + self.from_source if self.loaded else []:
                print(line, flush=True)
            if cfg.cooldown_epochs >= cfg.epochs:
                print(f'cooldown: {cfg.epochs - 1} of the recipe\'s {cfg.cooldown_epochs} cooldown epochs fit '
                      f'in {cfg.epochs} epochs', flush=True)
        if self.loaded and not self.history:
            self._evaluate_start()
        total_steps = self.total_epochs * self.steps_per_epoch
        bar = tqdm(total=total_steps, initial=self.global_step, unit='step', disable=not self.progress,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)
        start_wall = time.time()
        while self.epoch < self.total_epochs:
            self.train_set.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            loss_sum, seen, t0 = 0.0, 0, time.time()
            for images, targets, skipped in self._loader(self.train_set, self.sampler):
                self.skips.add(skipped)
                if images is None or images.shape[0] < 2:
                    continue
                loss = self._step(images, targets)
                self.batch_in_epoch += 1
                loss_sum += loss * images.shape[0]
                seen += images.shape[0]
                rate = seen * self.ddp.world_size / max(time.time() - t0, 1e-9)
                bar.set_description(f'epoch {self.epoch + 1}/{self.total_epochs}', refresh=False)
                lr = self.optimizer.param_groups[0]['lr']
                bar.set_postfix(loss=f'{loss:.3f}', img_s=f'{rate:.0f}', lr=f'{lr:.2e}', refresh=False)
                bar.update(1)
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self._save()
            train_time = time.time() - t0
            sums = all_reduce(torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=self.device)).cpu()
            record = {'epoch': self.epoch + 1, 'train_loss': float(sums[0] / max(sums[1], 1)),
                      'lr': self.optimizer.param_groups[0]['lr'],
                      'images_per_s': float(sums[1]) / max(train_time, 1e-9), 'train_time_s': train_time}
            if (self.epoch + 1) % self.cfg.eval_every == 0 or self.epoch + 1 == self.total_epochs:
                record.update(self._evaluate())
            record['wall_time_s'] = time.time() - start_wall
            self.history.append(record)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.epoch % cfg.checkpoint_epochs == 0 or self.epoch == self.total_epochs:
                self._save()
            if self.ddp.main:
                write_metrics(files, self.history)
                bar.write(f'epoch {record["epoch"]}: loss {record["train_loss"]:.4f}'
                          + (f', top-1 {record["top1"]:.2f}%' if 'top1' in record else '')
                          + self._ema_note(record)
                          + f', {record["images_per_s"]:.0f} img/s')
        bar.close()
        return self._finish()

    def _evaluate_start(self) -> None:
        """Epoch 0: the weights the run starts from, so that metrics.jsonl shows what training gained."""
        record = {'epoch': 0, **self._evaluate(), 'wall_time_s': 0.0}
        self.history.append(record)
        if self.ddp.main:
            write_metrics(self.files, self.history)
            print(f'epoch 0 (the starting weights): top-1 {record["top1"]:.2f}%', flush=True)

    def _evaluate(self) -> Dict[str, Any]:
        loader = self._loader(self.val_set, self.val_sampler)
        res = evaluate(self.model, loader, self.device, self.num_classes, self.cfg.amp, self.skips)
        out = {'top1': res['top1'], 'top5': res['top5'], 'eval_loss': res['loss']}
        if self.ema is not None:
            # the share only falls as steps go on: once low enough, it need not be walked again
            share = 0.0 if self._ema_settled else ema_start_share(self.ema.get_decay, self.global_step)
            self._ema_settled = share <= EMA_REPORT_MAX_START_SHARE
            if self._ema_settled:
                ema = evaluate(self.ema.module, loader, self.device, self.num_classes, self.cfg.amp, self.skips)
                out.update(ema_top1=ema['top1'], ema_top5=ema['top5'], ema_eval_loss=ema['loss'])
            else:  # mostly the weights it started from: its figure would say nothing about the run
                out['ema_start_share'] = share
        return out

    def _ema_note(self, record: Dict[str, Any]) -> str:
        """What the epoch line and the summary say of the EMA: its top-1, or why it has none."""
        if 'ema_top1' in record:
            return f' (EMA {record["ema_top1"]:.2f}%)'
        if 'ema_start_share' in record:
            return (f' (EMA not reported: {record["ema_start_share"]:.0%} of it is still its starting weights '
                    f'after {self.global_step} steps at ema_decay {self.cfg.ema_decay:g})')
        return ''

    def _finish(self) -> Dict[str, Any]:
        files, last = self.files, self.history[-1]
        skipped = gather_paths(self.skips)
        train_time = sum(h.get('train_time_s', 0) for h in self.history)
        summary = {
            'model': self.cfg.model, 'params': num_params(self.model),
            'top1': last['top1'], 'top5': last['top5'], 'eval_loss': last['eval_loss'],
            'epochs': self.epoch, 'steps': self.global_step,
            'images_per_s': sum(h.get('images_per_s', 0) * h.get('train_time_s', 0) for h in self.history)
            / max(train_time, 1e-9),
            'train_time_s': train_time,
            'skipped_files': len(skipped), 'skipped_paths': skipped[:100],
            'num_train': self.data.num_train, 'num_val': self.data.num_val, 'world_size': self.ddp.world_size,
        }
        if 'ema_top1' in last:
            summary.update(ema_top1=last['ema_top1'], ema_top5=last['ema_top5'])
        if self.history[0]['epoch'] == 0:
            summary.update(start_top1=self.history[0]['top1'], start_top5=self.history[0]['top5'])
        if self.ddp.main:
            extra = {'data_config': self.data_config, 'classes': self.data.classes}
            save_weights(self.model, files.weights, self.cfg.model, self.model_args, extra)
            if self.ema is not None:
                save_weights(self.ema.module, files.ema_weights, self.cfg.model, self.model_args, extra)
            atomic_write_text(files.summary, json.dumps(summary, indent=2) + '\n')
            line = f'done: top-1 {summary["top1"]:.2f}%, top-5 {summary["top5"]:.2f}%'
            note = self._ema_note(last)
            line += note.replace('(EMA ', '(EMA top-1 ', 1) if 'ema_top1' in last else note
            line += f' on {self.data.num_val} held-out images; {summary["images_per_s"]:.0f} img/s'
            if skipped:
                line += f'; {len(skipped)} unreadable file(s) skipped (listed in summary.json)'
            print(f'{line}\nresults: {files.root}/ (summary.json, metrics.jsonl, model.safetensors)', flush=True)
        return summary
