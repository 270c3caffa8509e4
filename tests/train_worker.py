"""One rank of the data-parallel training runs of tests/test_train_distributed.py, started by torchrun:

    torchrun --standalone --nproc_per_node N tests/train_worker.py CONFIGS_JSON

Runs microllama.train.loop.train on each TrainConfig (a JSON list of their fields) in turn, in one process group:
one torchrun start for several runs."""

import json
import sys

from microllama.train.config import TrainConfig
from microllama.train.loop import train

if __name__ == "__main__":
    for fields in json.loads(sys.argv[1]):
        train(TrainConfig(**fields))
