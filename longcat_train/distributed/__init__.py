"""Training on several processes beyond data parallelism: the frozen DiT's weights sharded over
them (`fsdp.py`), and the step time and throughput N GPUs are predicted to reach (`throughput.py`)."""

from longcat_train.distributed.fsdp import average_gradients, shard_frozen_weights
from longcat_train.distributed.throughput import Throughput, predict_throughput

__all__ = ["Throughput", "average_gradients", "predict_throughput", "shard_frozen_weights"]
