"""The child process that pretrains the organism under pinned float kernels (see model.REPRODUCIBLE_NUMERICS).

Run by model.load_organism as `python -m spillover.organism.pretrain_process FOLDER` with the pickled
OrganismConfig on stdin; the environment it inherits carries the pinned settings."""

import pickle
import sys
from pathlib import Path

from .model import pretrain_and_save

if __name__ == "__main__":
    pretrain_and_save(pickle.loads(sys.stdin.buffer.read()), Path(sys.argv[1]))
