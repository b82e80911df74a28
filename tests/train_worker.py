"""One training run in a process of its own, for tests/test_train_engine.py: a fresh run or a resumed one, on a
synthetic target set, with a fault on request (a signal to itself at an iteration, or SIGKILL as a file is renamed)."""
import os, signal, sys
from pathlib import Path

import torch
from fastcore.script import call_parse

from uas.config import TrainSettings
from uas.data import VideoDataset, read_annotations
from uas.model import build_recognizer
from uas.train import Callback, Learner, TrainingInterrupted, seed_everything
from uas.video import get_pipeline


class SignalAt(Callback):
    "Send `signum` to this process after iteration `iteration` (deterministic: no timing involved)."
    order = 100
    def __init__(self, iteration, signum): self.iteration, self.signum = iteration, signum
    def after_batch(self, learn):
        if learn.iter == self.iteration: os.kill(os.getpid(), self.signum)


def kill_on_replace(name):
    "Make `os.replace` SIGKILL this process instead of renaming a file to `name`: a kill between writing and renaming."
    replace = os.replace
    def dying_replace(src, dst, *args, **kwargs):
        if Path(dst).name == name: os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)
    os.replace = dying_replace


def settings(mode, epochs=4):
    "4 clips per optimizer step in micro-batches of 2, validation every 2 epochs, float32."
    return TrainSettings(mode=mode, epochs=epochs, batch_size=4, update_interval=2, val_interval=2, amp='no', seed=3)


def datasets(root, lists):
    pipeline = lambda stage: get_pipeline(f'chimpbehave_{stage}', clip_len=4, short_side=32, crop_size=32)
    return [VideoDataset(read_annotations(lists[split]), root, pipeline(stage)) for split, stage in (('train', 'train'), ('val', 'val'))]


@call_parse
def main(root:str, # the synthetic target set's folder (its lists: root/train.txt, root/val.txt)
         work_dir:str, # the run folder
         mode:str='uas', # 'uas' (faithful) or 'lora'
         resume:bool=False, # resume from work_dir/latest.pth
         kill_at:int=0, # SIGKILL this process after this iteration (0: never)
         sigint_at:int=0, # SIGINT this process after this iteration (0: never)
         kill_renaming:str=None, # SIGKILL this process when it renames a file to this name
        ):
    torch.set_num_threads(1)
    if kill_renaming: kill_on_replace(kill_renaming)
    seed_everything(0)
    model = build_recognizer('swin3d_mini', 3, mode=mode, lora_rank=4)
    train, val = datasets(root, {s: Path(root)/f'{s}.txt' for s in ('train', 'val')})
    cbs = [SignalAt(kill_at, signal.SIGKILL)] * bool(kill_at) + [SignalAt(sigint_at, signal.SIGINT)] * bool(sigint_at)
    learn = Learner(model, settings(mode), train, val, work_dir=work_dir, cbs=cbs, progress=False)
    try: learn.fit(resume='latest' if resume else None)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
