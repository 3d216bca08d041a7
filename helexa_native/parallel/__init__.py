"""Tensor parallelism: a model split over several ranks that add their partial results.

sharding.py     which slice of each weight a rank holds; cutting it from a loader's tensor
collective.py   the two collectives a shard calls; the in-process group (ranks as threads)
shard_model.py  one rank's part of the CPU reference decoder
backend.py      ShardedCPUBackend: N thread ranks in one process behind the Backend contract
distributed.py  ranks as processes (torchrun): the leader's backend and the followers' loop, and
                the leader/follower protocol the GPU ranks share
gpu_shard.py    one GPU rank: what its GpuModel loads, its spec, waiting on its step jobs
cuda_backend.py ShardedCUDABackend: one device worker per GPU of one process, NCCL + peer all-reduce
cuda_distributed.py  GPU ranks as processes (torchrun): the CUDA leader and followers
launch.py       the one place an Engine picks its tensor-parallel backend
watchdog.py     the thread that notices a step running past its limit
"""
