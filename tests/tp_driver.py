"""One rank of a two-process tensor-parallel Engine, for test_tensor_parallel.py.

Started twice with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). Rank 0 generates greedily and prints one JSON line: the
tokens, or the error it met. Rank 1's Engine constructor serves rank 0's
steps and never returns. --fault makes rank 1 misbehave at its
--fault-step-th step (hang: sleep; kill: SIGKILL itself), or (idle) lets the
test kill rank 1 between two generations: rank 0 then prints "ready" and
waits for its health to turn false. An Engine that fails to start prints
its error the same way.
"""

import argparse
import json
import os
import signal
import sys
import time

from helexa_native import Engine
from helexa_native.parallel import shard_model


def _inject(fault: str, at_step: int) -> None:
    calls = [0]
    forward = shard_model.ShardModel.forward_batch

    def faulty(self, seqs, all_logits=False):
        calls[0] += 1
        if calls[0] == at_step:
            if fault == "hang":
                time.sleep(60)
            elif fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, seqs, all_logits=all_logits)

    shard_model.ShardModel.forward_batch = faulty


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--fault", choices=("none", "hang", "kill", "idle"), default="none")
    p.add_argument("--fault-step", type=int, default=3)
    p.add_argument("--step-timeout", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    if int(os.environ["RANK"]) == 1 and args.fault in ("hang", "kill"):
        _inject(args.fault, args.fault_step)
    try:
        eng = Engine(
            args.model, device="cpu", n_ctx=64, tensor_parallel=2, step_timeout=args.step_timeout, progress=False
        )
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
        return 1
    prompt = [5, 7, 9, 11]
    out = {}
    t0 = time.monotonic()
    try:
        out["tokens"] = eng.generate(prompt, temperature=0, max_tokens=args.max_tokens, ignore_eos=True).token_ids
    except Exception as e:
        out.update(error=type(e).__name__, message=str(e), seconds=time.monotonic() - t0)
    out["healthy"] = eng.info()["healthy"]
    if args.fault == "idle":
        print(json.dumps({"ready": True}), flush=True)
        t0 = time.monotonic()
        while eng.info()["healthy"] and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        out.update(healthy_after_kill=eng.info()["healthy"], seconds=time.monotonic() - t0)
        try:
            eng.generate(prompt, temperature=0, max_tokens=2)
        except Exception as e:
            out.update(error=type(e).__name__, message=str(e))
    print(json.dumps(out), flush=True)
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
