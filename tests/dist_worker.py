"""Jobs that tests/test_distributed.py runs under torchrun, each rank the same code (and in its own process alone, for
the one-process reference): a float32 feature cache, 3 optimizer steps in the cached `uas` mode and in `lora`, an
evaluation; and `uas_extract` with a rank that dies after writing its first shard."""
import os, signal, sys
from dataclasses import replace
from pathlib import Path

import torch

import uas.features
from train_worker import datasets
from uas.cli import run_script, uas_extract
from uas.config import TrainSettings
from uas.data import world
from uas.features import extract_features
from uas.model import build_recognizer
from uas.train import CancelFitException, Callback, Learner, evaluate_online, seed_everything


def settings(mode, micro_batch):
    "2 epochs of 5 clips in micro-batches of `micro_batch` clips a process, a step every 2: 3 optimizer steps, float32."
    return TrainSettings(mode=mode, epochs=2, batch_size=2 * micro_batch, update_interval=2, val_interval=2, amp='no', seed=3)


def recognizer(mode):
    "The same model on every rank and in every run: seeded, no dropout, no drop path."
    seed_everything(0)
    return build_recognizer('swin3d_mini', 3, mode=mode, lora_rank=4, dropout=0., drop_path_rate=0.)


class StopAfter(Callback):
    "End the fit after epoch `epochs`, once its checkpoint is written."
    order = 40
    def __init__(self, epochs): self.epochs = epochs
    def after_epoch(self, learn):
        if learn.epoch + 1 == self.epochs: raise CancelFitException()


def train_and_evaluate(root, lists, out:Path, micro_batch:int, resume:bool=False):
    """Into `out`: float32 caches of the train and val splits (`train_cache`, `val_cache`), a cached `uas` run (`uas`; with
    `resume`, stopped after epoch 1 and resumed in a new `Learner`), a `lora` run (`lora`), and the evaluation of a fresh
    model on the val split (`evaluation.pt`)."""
    train, val = datasets(root, lists)
    model = recognizer('uas')
    caches = [extract_features(model.backbone, data, out/f'{name}_cache', dtype='float32', shard_size=2, progress=False)
              for name, data in (('train', train), ('val', val))]
    cached = replace(settings('uas', micro_batch), cached=True)
    if resume:
        Learner(model, cached, *caches, work_dir=out/'uas', cbs=[StopAfter(1)], progress=False).fit()
        model = recognizer('uas')
    Learner(model, cached, *caches, work_dir=out/'uas', progress=False).fit(resume='latest' if resume else None)
    Learner(recognizer('lora'), settings('lora', micro_batch), train, val, work_dir=out/'lora', progress=False).fit()
    evaluation = evaluate_online(recognizer('uas'), val, batch_size=2, progress=False)
    if world()[0] == 0: torch.save(dict(metrics=evaluation.metrics, scores=evaluation.scores, indices=evaluation.indices),
                                   out/'evaluation.pt')


def die_after_first_shard():
    "Make this process SIGKILL itself right after it writes its first feature shard."
    save = uas.features._save_atomic
    def save_and_die(obj, path):
        save(obj, path)
        if path.name.startswith('shard_'): os.kill(os.getpid(), signal.SIGKILL)
    uas.features._save_atomic = save_and_die


if __name__ == '__main__':
    torch.set_num_threads(1)
    job, *args = sys.argv[1:]
    if job == 'train':
        root, train_list, val_list, out = args
        train_and_evaluate(root, dict(train=train_list, val=val_list), Path(out), micro_batch=1, resume=True)
    elif job == 'extract_dying':
        if os.environ.get('RANK') == '1': die_after_first_shard()
        sys.exit(run_script(uas_extract, 'uas_extract', args))
    else: sys.exit(f'unknown job {job!r}')
