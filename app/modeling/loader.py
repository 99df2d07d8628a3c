"""Checkpoint + tokenizer loading with KoGPT-2's special-token conventions.

KoGPT-2 checkpoints (skt/kogpt2-base-v2) ship a bare `tokenizer.json`; their model card
loads it as

    PreTrainedTokenizerFast.from_pretrained(path, bos_token="</s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")

`load_model` does the same, then checks what would otherwise fail late and obscurely in
the engine (token ids past the embedding matrix, no pad token, a non-GPT-2 model) and
raises `ModelLoadError` with the file at fault and the fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parents[2] / "models" / "kogpt2-mini"

# The model card's keyword arguments: KoGPT-2 uses </s> as both bos and eos.
KOGPT2_SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}

SUPPORTED_MODEL_TYPES = ("gpt2",)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
# "owner/name" or a legacy single-segment name ("gpt2"); no path syntax.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelLoadError(RuntimeError):
    """A checkpoint cannot be served; the message names the file at fault and the fix."""


@dataclass
class LoadedModel:
    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerFast
    config: GPT2Config
    generation_config: GenerationConfig
    name: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else must exist on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return dev


def select_device(device: str = "auto") -> torch.device:
    """`resolve_device`, a CUDA device with its index, made the current device: CUDA graph
    capture and the default streams are the current device's (`--device cuda:N`, issue #22)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda" / "auto": the current device, named
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU (fp16 matmuls
    on CPU are slow and lossy)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        names = "auto, " + ", ".join(sorted(_DTYPES))
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {names}") from None


def load_model(path_or_hub_id: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a local KoGPT-2 directory or hub id, checked, on `device` in eval mode."""
    dev = select_device(device)
    dt = resolve_dtype(dtype, dev)
    source, name, local = _locate(str(path_or_hub_id))
    where = f"{source}/config.json" if local else f"config.json of hub model {source!r}"

    config_dict = _read_config(source, local)
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{where}: model_type {model_type!r} is not supported; kogpt-serve serves GPT-2 "
            f'architecture models only (model_type "gpt2", as KoGPT-2 is)'
        )
    config = GPT2Config.from_dict(config_dict)

    tokenizer = _load_tokenizer(source, local)
    n_tokens = len(tokenizer)
    if n_tokens > config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer of {source} has {n_tokens} tokens but {where} says vocab_size "
            f"{config.vocab_size}: ids >= {config.vocab_size} would index past the embedding "
            f"matrix. Checkpoints of KoGPT-2 v1 (vocab 50000) circulate with a config of "
            f'another size. Set "vocab_size" in config.json to the row count of '
            f"transformer.wte.weight in the weights (it must be >= {n_tokens}), or use "
            f"skt/kogpt2-base-v2 (vocab 51200)."
        )
    pad_id = tokenizer.pad_token_id
    assert pad_id is not None  # _load_tokenizer guarantees it
    # The engine pads batches and generate() needs it; old configs leave it unset.
    if config.pad_token_id is None:
        config.pad_token_id = pad_id

    model = _load_weights(source, config, dt, where)
    model.to(dev).eval()
    config = model.config  # from_pretrained keeps a copy; hand out the one the model uses
    # KoGPT-2 ships no tokenizer_config.json, so its max length defaults to "infinite".
    tokenizer.model_max_length = min(tokenizer.model_max_length, config.n_positions)
    gen_config = model.generation_config
    if gen_config.pad_token_id is None:
        gen_config.pad_token_id = pad_id
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(gen_config, attr) is None:
            setattr(gen_config, attr, getattr(config, attr))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        generation_config=gen_config,
        name=name,
        device=dev,
        dtype=dt,
    )


# --------------------------------------------------------------------------- helpers


def _locate(spec: str) -> tuple[str, str, bool]:
    """(source for from_pretrained, display name, is_local); checks a local dir's files."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path.resolve()
        _check_local_files(path)
        return str(path), path.name, True
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass the model directory that contains it")
    if _HUB_ID.match(spec) and ".." not in spec:
        return spec, spec, False
    raise ModelLoadError(
        f"{spec!r} is neither an existing directory nor a Hugging Face hub id "
        f"(owner/name, e.g. skt/kogpt2-base-v2); the embedded default is {DEFAULT_MODEL_DIR}"
    )


def _check_local_files(path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (" + " or ".join(WEIGHT_FILES) + ")")
    if not (path / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if not missing:
        return
    if path == DEFAULT_MODEL_DIR:
        fix = "rebuild the embedded model: python models/build_embedded.py"
    else:
        fix = (
            "copy them from the original checkpoint (e.g. huggingface-cli download "
            "skt/kogpt2-base-v2 --local-dir DIR); KoGPT-2 needs its fast tokenizer file "
            "tokenizer.json"
        )
    raise ModelLoadError(f"{path} is missing {', '.join(missing)}: {fix}")


def _read_config(source: str, local: bool) -> dict[str, Any]:
    if local:
        file = Path(source) / "config.json"
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{file} is not readable JSON ({exc}); restore it") from exc
        if not isinstance(data, dict):
            raise ModelLoadError(f"{file} must hold a JSON object")
        return data
    try:
        data, _ = GPT2Config.get_config_dict(source)
    except Exception as exc:  # network, auth, missing repo: all mean "cannot fetch"
        raise ModelLoadError(
            f"cannot fetch config.json of {source!r} from the Hugging Face hub ({exc}); it "
            f"is not a local directory either. Check the id and the network, or pass a "
            f"downloaded directory"
        ) from exc
    return data


def _load_tokenizer(source: str, local: bool) -> PreTrainedTokenizerFast:
    """The model card's from_pretrained, passing only the KoGPT-2 specials that
    tokenizer.json has: from_pretrained *adds* a missing one with a new id, which would
    silently put pad/eos past the embedding matrix."""
    where = f"{source}/tokenizer.json" if local else f"tokenizer.json of hub model {source!r}"
    try:
        file_vocab = _file_vocab(source, local)
        present = {k: v for k, v in KOGPT2_SPECIAL_TOKENS.items() if v in file_vocab}
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source, **present)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {where} as a fast tokenizer ({exc}); KoGPT-2 ships a "
            f"tokenizers-library tokenizer.json: restore it from the original checkpoint"
        ) from exc
    if tokenizer.pad_token is None or tokenizer.pad_token not in file_vocab:
        raise ModelLoadError(
            f'{where} has no pad token: KoGPT-2\'s is "<pad>" (id 3). Add "<pad>" to its '
            f'vocabulary and added_tokens, or set "pad_token" in tokenizer_config.json to '
            f"a token that tokenizer.json has"
        )
    return tokenizer


def _file_vocab(source: str, local: bool) -> dict[str, int]:
    """Tokens of tokenizer.json itself (with its added_tokens), before any config adds more."""
    if local:
        file = str(Path(source) / "tokenizer.json")
    else:
        from huggingface_hub import hf_hub_download  # only needed for hub ids

        file = hf_hub_download(source, "tokenizer.json")
    vocab: dict[str, int] = Tokenizer.from_file(file).get_vocab(with_added_tokens=True)
    return vocab


def _load_weights(
    source: str, config: GPT2Config, dtype: torch.dtype, where: str
) -> GPT2LMHeadModel:
    try:
        model, info = GPT2LMHeadModel.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True
        )
    except Exception as exc:  # size mismatch, corrupt file, network
        raise ModelLoadError(
            f"cannot load the weights of {source} with {where} ({exc}); the config "
            f"(vocab_size, n_embd, n_layer, n_head, n_positions) must match the checkpoint"
        ) from exc
    # from_pretrained only warns and initialises at random what it cannot load.
    bad = sorted(info.get("missing_keys", ())) + sorted(
        str(k) for k in info.get("mismatched_keys", ())
    )
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ModelLoadError(
            f"the weights of {source} lack or mis-shape tensors the GPT-2 config in {where} "
            f"needs ({shown}): the weights file is incomplete or was saved for another "
            f"architecture or config"
        )
    return model
