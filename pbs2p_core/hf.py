"""An artifact in plain transformers: `AutoModelForCausalLM.from_pretrained(artifact_dir)` with the compressed
linears kept packed (`PackedLinear`), through transformers' extension point for quantization methods.

Importing this module (as `import pbs2p.hf`) registers `Pbs2pConfig` and `Pbs2pHfQuantizer` for the
`quant_method` "pbs2p" that the artifact's config.json names (`quantization_config`). How an artifact is read:

- `update_attn_implementation` (the one hook that sees the model config before the weights are looked for) points
  transformers at the artifact's weight index (`transformers_weights` = `pbs2p.safetensors.index.json`). An
  artifact has no `model.safetensors*`: where the quantizer is not registered, transformers warns about the
  unknown quant_method and then raises "no file named model.safetensors", never building random weights.
- Before the weights load (from a hub: the manifest and the files transformers did not fetch are fetched at the
  same commit): the whole artifact is verified (`verify_artifact`: every sha256, header, layout), its
  tensors are checked against the model the config builds, and every compressed `nn.Linear` is replaced by a
  `PackedSlot` whose meta-device buffers carry the artifact's tensor names (`weight:sign`, and `weight:scale`
  holding `alpha`, ... for `weight:scale.alpha`), so transformers loads the packed tensors as they are stored
  (dtype kept), onto the device of the device map.
- After: each slot becomes a `PackedLinear` (every code checked by one decode, as `load_artifact` does).

`model.dequantize()` gives the dense model (Ŵ in the model's dtype); `save_pretrained` of a packed model is
refused (the artifact is its own saved form; dequantize first for a dense checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.hooks import add_hook_to_module
from huggingface_hub import hf_hub_download
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import ArtifactError, Pbs2pError
from .format.linear import decode_linear, expected_tensors
from .format.loader import Artifact, PackedLinear, verify_artifact
from .format.manifest import (
    FORMAT_NAME,
    HF_FORMAT_VERSION,
    HF_INDEX_FILE,
    MANIFEST_FILE,
    QUANT_METHOD,
    SEP,
    ST_TORCH,
    read_manifest,
)


class Pbs2pConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of an artifact: the format, its version and the weight index.
    A version newer than this pbs2p reads is refused here, before anything is built."""

    def __init__(
        self,
        format: str = FORMAT_NAME,  # the field's name in config.json
        format_version: int = HF_FORMAT_VERSION,
        weights: str = HF_INDEX_FILE,
        **unknown: Any,  # fields of a later pbs2p: ignored, as readers of the manifest ignore them
    ) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # a str: transformers knows no enum for it
        self.format = format
        self.format_version = format_version
        self.weights = weights
        if format != FORMAT_NAME:
            raise ArtifactError(f"config.json's quantization_config has format {format!r}, not {FORMAT_NAME!r}")
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise ArtifactError(
                f"config.json's quantization_config has format_version {format_version!r}; a positive integer is "
                f"expected"
            )
        if format_version > HF_FORMAT_VERSION:
            raise ArtifactError(
                f"config.json's quantization_config is pbs2p format version {format_version}, written by a newer "
                f"pbs2p; this pbs2p reads format versions up to {HF_FORMAT_VERSION}: upgrade pbs2p"
            )
        if (
            not isinstance(weights, str)
            or not weights.endswith(".safetensors.index.json")
            or "/" in weights
            or "\\" in weights
        ):
            raise ArtifactError(
                f"config.json's quantization_config names the weight index {weights!r}; a file name ending in "
                f".safetensors.index.json is expected"
            )


class PackedSlot(nn.Module):
    """Where a compressed linear's packed tensors land while transformers loads them: meta-device buffers named
    as the artifact's tensors (`<module>.weight:sign` is this module's buffer `weight:sign`; `weight:scale.alpha`
    is the buffer `alpha` of the child `weight:scale`), and the linear's bias. Replaced by `PackedLinear`."""

    def __init__(self, name: str, meta: Mapping[str, Any], bias: nn.Parameter | None) -> None:
        super().__init__()
        self.name = name
        self.meta = dict(meta)
        self.field_names = sorted(expected_tensors(meta))
        for field_, (dt, shape) in expected_tensors(meta).items():
            owner, buf = self._where(field_, create=True)
            owner.register_buffer(buf, torch.empty(shape, dtype=ST_TORCH[dt], device="meta"))
        self.bias = bias

    def _where(self, field_: str, create: bool = False) -> tuple[nn.Module, str]:
        head, dot, tail = field_.partition(".")
        if not dot:
            return self, f"weight{SEP}{field_}"
        if "." in tail:
            raise ArtifactError(
                f"{self.name}: packed field {field_!r} has more than one dot; this pbs2p cannot load it"
            )
        child = f"weight{SEP}{head}"
        if create and not hasattr(self, child):
            self.add_module(child, nn.Module())
        return getattr(self, child), tail

    def fields(self) -> dict[str, torch.Tensor]:
        out = {}
        for f in self.field_names:
            owner, buf = self._where(f)
            out[f] = getattr(owner, buf)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.name}: its packed tensors were not loaded (from_pretrained did not finish)")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    old = getattr(model.get_submodule(parent_name), child)
    hook = getattr(old, "_hf_hook", None)  # accelerate's device hook, where a device map put one on this module
    if hook is not None:
        add_hook_to_module(new, hook)
    setattr(model.get_submodule(parent_name), child, new)


def _fetch_from_hub(path: Path, repo_id: str) -> None:
    """A hub snapshot (`<cache>/models--org--name/snapshots/<commit>/`) where transformers fetched config.json, the
    index and the tensor files: fetch the manifest and every other file it lists, at the same commit."""
    hint = (
        f"{path} holds the artifact's weights but not its {MANIFEST_FILE}: pbs2p loads a whole artifact (download "
        f"it, e.g. `hf download REPO --local-dir DIR`, and load DIR)"
    )
    if path.parent.name != "snapshots" or Path(repo_id).exists():
        raise ArtifactError(hint)
    commit, cache = path.name, path.parents[2]
    try:
        hf_hub_download(repo_id, MANIFEST_FILE, revision=commit, cache_dir=cache)
        for fname in sorted(read_manifest(path)["files"]):
            if not (path / fname).is_file():
                hf_hub_download(repo_id, fname, revision=commit, cache_dir=cache)
    except ArtifactError:
        raise
    except Exception as exc:  # the hub client's errors (network, missing file, auth): the hint says what to do
        raise ArtifactError(f"{hint} ({type(exc).__name__}: {exc})") from exc


def _artifact_of(checkpoint_files: list[str] | None, repo_id: str) -> Artifact:
    if not checkpoint_files:
        raise ArtifactError("transformers found no weight files of the artifact")
    path = Path(checkpoint_files[0]).parent
    if not (path / MANIFEST_FILE).is_file():
        _fetch_from_hub(path, repo_id)
    art = verify_artifact(path)  # every file's size and sha256, headers, layouts: nothing partly checked is used
    got = sorted({Path(f).name for f in checkpoint_files})
    if got != art.tensor_files() or any(Path(f).parent != path for f in checkpoint_files):
        raise ArtifactError(
            f"{path / HF_INDEX_FILE} names the weight files {got[:3]}, {MANIFEST_FILE} {art.tensor_files()[:3]}: "
            f"the artifact is damaged, download it again"
        )
    return art


def _check_against_model(art: Artifact, model: nn.Module) -> None:
    """Every tensor of the artifact is a tensor of the model the config builds, with its shape, and every tensor
    of that model comes from the artifact (or is tied to one that does): transformers never initialises one."""
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors: dict[str, Any] = art.manifest["tensors"]
    for name, t in tensors.items():
        if name not in state:
            raise ArtifactError(f"{art.path / t['file']}: tensor {name!r} is not a tensor of this model")
        if tuple(t["shape"]) != state[name]:
            raise ArtifactError(
                f"{art.path / t['file']}: tensor {name!r} has shape {t['shape']}, the model's config.json implies "
                f"{list(state[name])}: wrong shape"
            )
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(state) - set(tensors) - tied)
    if missing:
        raise ArtifactError(f"{art.path / MANIFEST_FILE}: the artifact lacks tensors {missing[:5]}; it is incomplete")


class Pbs2pHfQuantizer(HfQuantizer):
    """Loads a pbs2p artifact (module docstring). Only pre-compressed artifacts: pbs2p compresses with
    `pbs2p compress`, not while loading."""

    requires_calibration = True
    quantization_config: Pbs2pConfig

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise Pbs2pError(
                "pbs2p does not compress while loading: compress with `pbs2p compress MODEL -o DIR`, then "
                "from_pretrained(DIR)"
            )
        super().__init__(quantization_config, **kwargs)
        self.artifact: Artifact | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, Mapping) and "disk" in device_map.values():
            raise Pbs2pError("a pbs2p model cannot be offloaded to disk; give a device_map without 'disk'")

    def update_attn_implementation(self, config: Any) -> Any:
        # the hook that sees the config before transformers looks for weights: point it at the artifact's index
        config.transformers_weights = self.quantization_config.weights
        return config

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        source = getattr(converter, "source_patterns", [""])[0]
        if SEP in source:  # a packed tensor: bit streams and scales keep their stored dtype
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        art = _artifact_of(kwargs.get("checkpoint_files"), str(getattr(model.config, "name_or_path", "")))
        for name, meta in sorted(art.linears.items()):
            mod_name = name.removesuffix(".weight")
            try:
                lin = model.get_submodule(mod_name)
            except AttributeError:
                lin = None
            shape = [int(x) for x in meta["shape"]]
            if not isinstance(lin, nn.Linear) or [lin.out_features, lin.in_features] != shape:
                raise ArtifactError(
                    f"{art.path / meta['file']}: compressed linear {name!r} of shape {shape} is not a linear "
                    f"layer of that shape in the model config.json describes: wrong shape"
                )
            _replace(model, mod_name, PackedSlot(mod_name, meta, lin.bias))
        _check_against_model(art, model)
        self.artifact = art
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        art = self.artifact
        assert art is not None
        for name, slot in [(n, m) for n, m in model.named_modules() if isinstance(m, PackedSlot)]:
            fields = slot.fields()
            where = art.path / slot.meta["file"]
            if any(t.is_meta for t in fields.values()) or (slot.bias is not None and slot.bias.is_meta):
                raise ArtifactError(f"{where}: the packed tensors of {name} were not loaded")
            try:
                decode_linear(fields, slot.meta, check=True)  # full check once, as load_artifact does
            except ArtifactError as exc:
                raise ArtifactError(f"{where}: {name}: {exc}") from None
            _replace(model, name, PackedLinear(slot.meta, fields, slot.bias))
        if hasattr(model.config, "transformers_weights"):
            del model.config.transformers_weights
        return model

    def _dequantize(self, model: Any, dtype: Any = None) -> Any:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]:
            w = mod.decode()
            dt = dtype or w.dtype
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta", dtype=dt)
            lin.weight = nn.Parameter(w.to(dt))
            if mod.bias is not None:
                lin.bias = nn.Parameter(mod.bias.detach().to(dt))
            _replace(model, name, lin)
        return model

    def is_serializable(self) -> bool:
        raise Pbs2pError(
            "save_pretrained of a packed pbs2p model is not supported: the artifact directory is its saved form "
            "(copy it); for a dense checkpoint, model.dequantize() first (or `pbs2p export-dense`)"
        )

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and the quantizer with transformers (done on import; a second call does nothing)."""
    for mapping, cls, reg in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, Pbs2pConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, Pbs2pHfQuantizer, register_quantizer),
    ):
        known = mapping.get(QUANT_METHOD)
        if known is None:
            reg(QUANT_METHOD)(cls)
        elif known is not cls:
            raise Pbs2pError(f"transformers already has a quant_method {QUANT_METHOD!r} ({known!r}), not pbs2p's")


register()
