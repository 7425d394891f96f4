"""Train a fusion model with Ray Train: ``python jobs/train.py --steps 1000 --num-workers 2``.

Same options as ``ray-mff train`` (see ``ray_mff/train/trainer.py``). Connects to a running Ray
cluster when ``RAY_ADDRESS`` is set, else starts a local one.
"""
import sys

from ray_mff.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
