"""The compressed artifact, format v1 (docs/artifact-format.md).

bitpack: bit streams, integer codes, the N:M rank code and the mask. linear: the codec of one compressed
linear. manifest: names, safetensors dtypes and header, the manifest. writer: `ArtifactWriter` (and
`add_transformers_files` for artifacts written before `pbs2p.hf`). loader: verification, iteration, decoding,
loading as a model. inspect: bit accounting. export: a dense checkpoint.
"""

from ..errors import ArtifactError
from .export import export_dense
from .inspect import format_inspect, inspect_artifact
from .linear import decode_linear, pack_linear, unpack_linear
from .loader import PackedLinear, dense_state_dict, is_artifact, load_artifact, verify_artifact
from .manifest import FORMAT_VERSION, MANIFEST_FILE, TIMINGS_FILE
from .writer import ArtifactWriter, add_transformers_files

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "TIMINGS_FILE",
    "ArtifactError",
    "ArtifactWriter",
    "PackedLinear",
    "add_transformers_files",
    "decode_linear",
    "dense_state_dict",
    "export_dense",
    "format_inspect",
    "inspect_artifact",
    "is_artifact",
    "load_artifact",
    "pack_linear",
    "unpack_linear",
    "verify_artifact",
]
