"""A compression job on a Ray cluster (the `ray` extra): the same artifact as the local path, byte for byte.

cluster: joining or starting Ray, the workers' resources. worker: the BlockWorker actor. coordinator: the job's
driver (`compress_model_ray`): orders the work, keeps the checkpoints' bookkeeping, writes the artifact.
"""

from .cluster import NAMESPACE, init_ray, shutdown_ray
from .coordinator import compress_model_ray

__all__ = ["NAMESPACE", "compress_model_ray", "init_ray", "shutdown_ray"]
