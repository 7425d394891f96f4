"""Train a fusion model with Ray Train: ``python jobs/train.py --steps 1000 --num-workers 2``.

Same options as ``ray-mff train`` (see ``ray_mff/train/trainer.py``). Connects to a running Ray
cluster when ``RAY_ADDRESS`` is set, else starts a local one without the dashboard (a long
background run on a shared machine should not pay for it).

The stack-native model's long run (issue 13; resumable, one thread, see
``ray_mff/models/weights/stacknet.md``)::

    OMP_NUM_THREADS=1 nohup python jobs/train.py --model stacknet --name stacknet --storage-path /work/runs \\
        --num-workers 1 --cpus-per-worker 1 --torch-threads 1 --batch-size 4 --patch 112 --steps 60000 \\
        --lr 1e-3 --warmup-steps 200 --report-every 10 --checkpoint-every 150 \\
        --resume-file /work/runs/stacknet/stacknet.resume.safetensors --log-csv /work/runs/stacknet/losses.csv \\
        > /work/runs/stacknet/train.log 2>&1 &

Fine-tuning one part on a frozen rest (``--train-only``; here the fused-result branch of
``stacknet_s`` on its trained decision, with the squared error alone and camera-like noise; see the
model card's "Fine-tuning the fused-result branch")::

    OMP_NUM_THREADS=1 nohup python jobs/train.py --model stacknet_s --init-weights BEST.safetensors \
        --train-only fused_net --loss-weights fused=0,blend=0,grad=0,dice=0,mse=1 \
        --photons 3000,30000 --read-noise 0.004 --name sns_corr_ln --storage-path /work/runs \
        --num-workers 1 --cpus-per-worker 1 --torch-threads 1 --batch-size 4 --patch 112 --steps 4000 \
        --lr 1e-3 --warmup-steps 50 --checkpoint-every 100 --log-csv /work/runs/sns_corr_ln/losses.csv \
        > /work/runs/sns_corr_ln/train.log 2>&1 &
"""
import os
import sys

from ray_mff.train.trainer import main

if __name__ == "__main__":
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(include_dashboard=False, object_store_memory=256 << 20, log_to_driver=True)
    sys.exit(main())
