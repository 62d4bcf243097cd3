"""The child process that pretrains the organism under pinned float kernels (see model.REPRODUCIBLE_NUMERICS).

Run by model.load_organism as `python -m spillover.organism.pretrain_process FOLDER` with the
OrganismConfig as JSON on stdin; the environment it inherits carries the pinned settings."""

import json
import sys
from pathlib import Path

from .model import OrganismConfig, pretrain_and_save

if __name__ == "__main__":
    pretrain_and_save(OrganismConfig.from_dict(json.loads(sys.stdin.read())), Path(sys.argv[1]))
