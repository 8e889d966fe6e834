"""pbs2p: batch compression of LLMs with PBS²P (1-bit weights on N:M sparsity).

The installed names map the repository's folders: `pbs2p.core` (pbs2p_core/: the algorithm and the artifact
format), `pbs2p.workers` (workers/: running a job), `pbs2p.service` (service/: the HTTP service, the job store
and the command line), `pbs2p.testing` (pbs2p_testing/: fixtures of the tests and benchmarks). Importing
`pbs2p` or any of them registers nothing (no plugin, no logging handler, no environment read), except
`pbs2p.hf` (= `pbs2p.core.hf`), whose import registers the artifact's quantization method with transformers.
"""
