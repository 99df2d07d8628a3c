"""Fine-tunes of the embedded model made here (no hub): tiny random LoRA adapters made with
peft, and full fine-tunes (the embedded weights perturbed, or a random model of another
depth with the same tokenizer). The tests of several models and adapters share them."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, GPT2LMHeadModel

EMBEDDED = Path(__file__).resolve().parents[1] / "models" / "kogpt2-mini"

# name: (seed, rank, alpha, target modules); "c_proj" targets attn.c_proj and mlp.c_proj.
ADAPTERS: dict[str, tuple[int, int, int, list[str]]] = {
    "poem": (11, 4, 16, ["c_attn"]),
    "chat": (12, 16, 64, ["c_attn", "c_proj", "c_fc"]),
}


def base_model(dtype: torch.dtype = torch.float64, path: Path | str = EMBEDDED) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path, torch_dtype=dtype).eval()


def make_adapter(
    folder: Path,
    seed: int,
    rank: int,
    alpha: int,
    targets: list[str],
    base: Path | str = EMBEDDED,
    use_rslora: bool = False,
) -> Path:
    """A peft LoRA adapter of the checkpoint at ``base`` with random A and B
    (init_lora_weights=False: B is not zero, so the adapter changes the output) saved to
    ``folder``."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        fan_in_fan_out=True,
        init_lora_weights=False,
        use_rslora=use_rslora,
    )
    get_peft_model(base_model(path=base), config).save_pretrained(folder)
    return folder


def make_adapters(root: Path) -> dict[str, Path]:
    return {name: make_adapter(root / name, *spec) for name, spec in ADAPTERS.items()}


def merged_model(path: Path, dtype: torch.dtype = torch.float64) -> GPT2LMHeadModel:
    """peft's merged model for the adapter at ``path`` (the reference output)."""
    return PeftModel.from_pretrained(base_model(dtype), path).merge_and_unload().eval()


def make_finetune(
    folder: Path,
    seed: int,
    scale: float = 0.02,
    *,
    config: dict[str, object] | None = None,
    generation: dict[str, object] | None = None,
    base: Path | str = EMBEDDED,
) -> Path:
    """A full checkpoint with the embedded model's tokenizer saved to ``folder``: its
    weights plus seeded noise of std ``scale`` (a "fine-tune"), or with ``config``
    overrides (e.g. n_layer: another KV layout) a random model of that config;
    ``generation`` overrides its generation_config (its own defaults, as a real fine-tune
    may ship). ``base``: the checkpoint to start from (its tokenizer too)."""
    torch.manual_seed(seed)
    model = base_model(torch.float32, base)
    if config is not None:
        random_config = model.config.__class__.from_dict({**model.config.to_dict(), **config})
        model = GPT2LMHeadModel(random_config).eval()
        model.generation_config = base_model(torch.float32, base).generation_config
    else:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * scale)
    for key, value in (generation or {}).items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder
