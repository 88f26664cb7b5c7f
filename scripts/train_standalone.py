"""Train one subnet of a candidate space alone, with the supernet's recipe: the weight-sharing baseline.

A supernet trains every subnet at once, so its largest subnet gets the same optimizer steps as a
stand-alone network but shares its weights with all the others. This script trains the chosen
subnet (default: the largest) as a stand-alone FP32 network with the same training preset (epochs,
batch size, learning rate, warm-up + cosine schedule, label smoothing, weight decay, augmentation,
resolution; the training engine with a :class:`~spaceevo.train.static.StaticTask`) and prints its
held-out and test top-1, so the cost of weight sharing at that preset is a measured number. No
quantization: compare with the supernet's FP32 figures.

    python scripts/train_standalone.py --space tiny-1111-0000 --threads 2
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from spaceevo.nn import Supernet
from spaceevo.space import load_space, require_candidate_space
from spaceevo.train.config import TrainConfig
from spaceevo.train.data import load_data, make_loader
from spaceevo.train.engine import Engine, EngineConfig, Phase
from spaceevo.train.evaluate import top1
from spaceevo.train.optim import make_optimizer
from spaceevo.train.static import StaticTask
from spaceevo.train.weights import initialize_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="tiny-1111-0000", help="candidate-space encoding")
    parser.add_argument("--subnet", default="max", help="subnet string, max or min (default: max)")
    parser.add_argument("--data", default="embedded", help="data set (as spaceevo train --data)")
    parser.add_argument("--preset", default="default", choices=["smoke", "default"], help="training preset")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's FP32 epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = TrainConfig.preset(args.preset, epochs=args.epochs)
    space = require_candidate_space(load_space(args.space), "train_standalone")
    supernet = Supernet(space)
    initialize_weights(supernet, zero_init_residual=config.zero_init_residual)
    subnet = space.subnet(args.subnet)
    supernet.set_active(subnet)
    model = supernet.extract().to(memory_format=torch.channels_last)
    del supernet

    datasets = load_data(args.data, subnet.resolution, seed=config.seed)
    loader = make_loader(datasets.train, config.batch_size, True, drop_last=True, seed=args.seed)
    steps_per_epoch = config.steps_in("fp32", len(loader))
    steps = config.epochs * steps_per_epoch
    task = StaticTask(model, loader, label_smoothing=config.label_smoothing, memory_format=torch.channels_last)
    optimizer = partial(make_optimizer, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    phase = Phase("fp32", config.epochs, steps_per_epoch, optimizer, warmup_steps=round(config.warmup_epochs * steps_per_epoch))
    result = Engine(task, EngineConfig(phases=(phase,), name="stand-alone training", progress=False)).run()
    model = task.model
    print(json.dumps({
        "space": space.encoding,
        "subnet": subnet.encode(),
        "data": args.data,
        "preset": args.preset,
        "epochs": config.epochs,
        "steps": steps,
        "batch_size": config.batch_size,
        "threads": args.threads,
        "train_s": round(result.train_s, 1),
        "heldout_fp32_top1": top1(model.eval(), make_loader(datasets.heldout, 500, False, workers=0, distributed=False)),
        "test_fp32_top1": top1(model, make_loader(datasets.test, 500, False, workers=0, distributed=False)),
    }))


if __name__ == "__main__":
    main()
