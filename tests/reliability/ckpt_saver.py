"""Helper process of test_checkpoint_atomic.py (run as a script, not collected by pytest).

Imports torch and Lightning once, then per line ``go`` read from stdin forks a child that saves
checkpoints of ``--mb`` megabytes to the same path in a loop, through the chosen checkpoint IO
(``atomic``: bpnp's ``AtomicCheckpointIO``; ``lightning``: Lightning's ``TorchCheckpointIO``),
printing ``pid <pid>`` once and ``saved <k>`` after each complete save; the test SIGKILLs the child
at random moments. The parent prints ``dead <pid>`` when the child is gone.
"""

import argparse
import os
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--io", choices=["atomic", "lightning"], default="atomic")
    ap.add_argument("--mb", type=float, default=40.0)
    args = ap.parse_args()
    if args.io == "atomic":
        from bpnp.training.checkpoint_io import AtomicCheckpointIO as IO
    else:
        from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO as IO
    io = IO()
    numel = int(args.mb * 2**20 / 4)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        pid = os.fork()
        if pid == 0:  # the saver
            k = 0
            print(f"pid {os.getpid()}", flush=True)
            while True:
                k += 1
                io.save_checkpoint({"version": k, "data": torch.full((numel,), float(k))}, args.path)
                print(f"saved {k}", flush=True)
        os.waitpid(pid, 0)
        print(f"dead {pid}", flush=True)


if __name__ == "__main__":
    main()
