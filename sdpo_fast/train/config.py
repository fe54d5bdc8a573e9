"""`TrainConfig`: every training option, merged from defaults < preset < YAML file < flags, then validated."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.prompts import HINDSIGHT_TEMPLATES, PROMPT_TRUNCATIONS
from ..demo.settings import TINY_DEMO_PRESET, TINY_DEMO_TRAIN
from ..utils.checks import check_bool, check_choice, check_int, check_number
from ..utils.files import write_text_atomic
from .options import LoRAOptions, ObjectiveOptions, StepSettings

LOSSES = ("sdpo", "sft")
AGGREGATIONS = ("sequence", "token")
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
REPORTERS = ("tensorboard", "wandb")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")

PRESETS: dict[str, dict[str, Any]] = {
    # Paper Table 5 and the authors' offline trainer (see shared/ANCHORS.md).
    "paper-offline": dict(
        loss="sdpo", batch_size=32, lr=2e-6, epochs=2, max_steps=None, warmup_ratio=0.05, schedule="cosine",
        max_grad_norm=10.0, optimizer="adamw8bit", weight_decay=0.0, ignore_first_k=2, signal_clip=None,
        temperature=1.0, aggregation="sequence", gradient_checkpointing=True, max_prompt_tokens=2048,
        max_completion_tokens=2048, max_history=5, data_preset="paper",
    ),
    TINY_DEMO_PRESET: dict(TINY_DEMO_TRAIN),
}
BUNDLED_PRESET = TINY_DEMO_PRESET


@dataclass
class TrainConfig(StepSettings, ObjectiveOptions, LoRAOptions):
    """Options of `sdpo-fast train`; `validate()` checks them and names the offending key. The step, objective
    and LoRA options come from train/options.py (shared with `OnlineConfig`)."""

    model: str | None = None
    """Hub id or local path; None: the bundled tiny Qwen3 (assets/tiny_model), with preset tiny-demo unless another
    preset is named."""
    data: str | None = None
    """Conversation source (see `load_interactions`); None: the bundled assets/tiny_sample.jsonl."""
    output_dir: str | None = None
    """None: runs/sdpo-<timestamp>."""
    loss: str = "sdpo"
    """sdpo, or sft (the paper's baseline: cross-entropy on the logged replies)."""
    aggregation: str = "sequence"
    """sequence: mean over each interaction's loss tokens, then over the step's interactions; token: mean over
    all loss tokens of the step."""
    batch_size: int = 32
    """Interactions per optimizer step."""
    epochs: int = 2
    max_steps: int | None = None
    """Overrides epochs when set."""
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    """cosine or constant, after the warm-up."""
    optimizer: str = "adamw"
    """adamw (fused on CUDA), adamw8bit (bitsandbytes) or sgd."""
    shuffle: bool = True
    gradient_checkpointing: bool | None = None
    """None: on for LoRA on CUDA (where 8B needs it), else off (checkpoint_layers, when set, says how many)."""
    checkpoint_layers: int | None = None
    """Checkpoint the FIRST N decoder layers (0 .. the model's layer count; recomputed in backward, the rest keep
    their activations). None: all layers when gradient_checkpointing resolves on, else 0; contradicting
    gradient_checkpointing (true with 0, false with N > 0) is refused."""
    offload_activations: bool = False
    """The checkpointed layers' inputs wait for backward in pinned CPU memory, copied there and back on a side
    stream (CUDA; on CPU accepted, nothing moves). Needs checkpointed layers."""
    dtype: str = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU; bfloat16 weights are stepped through fp32 master copies; float16
    is refused (no loss scaling)."""
    device: str = "auto"
    trust_remote_code: bool = False
    max_completion_tokens: int = 2048
    max_history: int = 5
    data_preset: str | None = None
    """Preset of `load_interactions`: "paper" (the authors' preprocessing per row format) or "strict"."""
    hindsight_template: str = "table1"
    """Teacher's hindsight block: "table1" (paper Table 1), "authors-offline" (the authors' offline trainer's
    wording) or a template with a {followup} slot."""
    prompt_truncation: str = "drop-turns"
    """Over-long prompts: "drop-turns" (oldest turns dropped) or "left" (ids cut from the left, the authors')."""
    save_steps: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir."""
    logging_steps: int = 1
    report_to: list[str] = field(default_factory=list)
    """Also log metrics to: tensorboard (output_dir/tensorboard), wandb (both optional packages)."""
    load_in_4bit: bool = False
    """QLoRA: the base weights in 4-bit NF4 (bitsandbytes, CUDA; needs lora_r > 0)."""
    use_liger: bool = False
    """Patch the model with Liger-Kernel's RMSNorm/SwiGLU/RoPE kernels (CUDA; liger-kernel installed)."""
    preset: str | None = None
    save_minutes: float | None = 30.0
    """Also checkpoint when this many minutes have passed since the last save (None: off)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints, deleting the oldest (never the newest complete one; None: keep all)."""
    check_memory: bool = True
    """On CUDA, simulate the step (`sdpo-fast plan`) before loading weights and refuse one that will not fit the
    card's free memory (load_in_4bit: NF4 weights modelled from bitsandbytes' storage, see train/plan.py)."""
    lora_dtype: str = "base"
    """base: LoRA adapters computed in the base weights' dtype (bf16 on CUDA; with load_in_4bit, the compute
    dtype), updated through fp32 master weights in the optimizer (train/precision.py); float32: adapters held in
    fp32 (peft's default; each adapter then keeps an fp32 copy of its bf16 input for backward: +0.45 GiB peak per
    4k-token micro-batch on Qwen3-8B, simulated)."""
    optimizer_in_backward: bool = False
    """Each parameter's update runs in backward as its gradient arrives, and the gradient is freed (train/optim.py);
    max_grad_norm then clips each parameter's gradient on its own."""
    dist_timeout_minutes: float = 30.0
    """Under torchrun: how long a rank waits in a collective for the others before the run fails."""
    offload_optimizer: bool = False
    """Optimizer state and fp32 master weights in CPU memory (torchao's CPUOffloadOptimizer; CUDA, adamw); each
    gradient leaves the GPU as it arrives, so max_grad_norm is not applied."""

    def validate(self) -> "TrainConfig":
        check_choice("loss", self.loss, LOSSES)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        self.validate_objective()
        check_choice("lora_dtype", self.lora_dtype, ("float32", "base"))
        if self.preset is not None:
            check_choice("preset", self.preset, tuple(PRESETS))
        for key in ("batch_size", "epochs", "max_completion_tokens", "max_history", "logging_steps"):
            check_int(key, getattr(self, key), 1)
        check_int("save_steps", self.save_steps, 0)
        check_int("max_steps", self.max_steps, 1, optional=True)
        self.validate_step()
        self.validate_lora()
        if self.ignore_first_k >= self.max_completion_tokens:
            raise ValueError(f"ignore_first_k {self.ignore_first_k} >= max_completion_tokens "
                             f"{self.max_completion_tokens} trains nothing (every completion token is left out of "
                             "the loss); lower ignore_first_k")
        check_number("warmup_ratio", self.warmup_ratio)
        if self.warmup_ratio >= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1.0), got {self.warmup_ratio!r}")
        if self.gradient_checkpointing is not None:
            check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_int("checkpoint_layers", self.checkpoint_layers, 0, optional=True)
        if self.gradient_checkpointing is not None and self.checkpoint_layers is not None \
                and self.gradient_checkpointing != (self.checkpoint_layers > 0):
            raise ValueError(f"gradient_checkpointing {self.gradient_checkpointing} contradicts checkpoint_layers "
                             f"{self.checkpoint_layers}; set one of them")
        for key in ("shuffle", "trust_remote_code", "resume", "load_in_4bit", "use_liger", "check_memory",
                    "optimizer_in_backward", "offload_optimizer", "offload_activations"):
            check_bool(key, getattr(self, key))
        check_choice("prompt_truncation", self.prompt_truncation, PROMPT_TRUNCATIONS)
        if not isinstance(self.hindsight_template, str) or (
                self.hindsight_template not in HINDSIGHT_TEMPLATES and "{followup}" not in self.hindsight_template):
            raise ValueError(f"hindsight_template must be one of {sorted(HINDSIGHT_TEMPLATES)} or contain "
                             f"'{{followup}}', got {self.hindsight_template!r}")
        for key in ("model", "data", "output_dir", "data_preset"):
            if getattr(self, key) is not None and not (isinstance(getattr(self, key), str) and getattr(self, key)):
                raise ValueError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        if not (isinstance(self.report_to, list) and all(r in REPORTERS for r in self.report_to)):
            raise ValueError(f"report_to must be a list among {list(REPORTERS)}, got {self.report_to!r}")
        if self.dtype == "float16":
            raise ValueError("dtype float16 has no loss scaling here (small gradients underflow to zero); use "
                             "dtype bfloat16 (same memory, fp32 range)")
        if self.offload_activations and (self.gradient_checkpointing is False or self.checkpoint_layers == 0):
            raise ValueError("offload_activations moves checkpointed layers' inputs, but "
                             + ("gradient_checkpointing is false" if self.gradient_checkpointing is False
                                else "checkpoint_layers is 0") + "; checkpoint some layers or unset it")
        if self.optimizer_in_backward and self.offload_optimizer:
            raise ValueError("offload_optimizer already overlaps the update with backward; unset optimizer_in_backward")
        if self.load_in_4bit and not self.lora_r:
            raise ValueError("load_in_4bit (QLoRA) trains adapters only: set lora_r > 0")
        for key in ("signal_clip", "importance_clip"):
            if self.loss == "sft" and getattr(self, key) is not None:
                raise ValueError(f"{key} applies to loss 'sdpo' only; unset it for loss 'sft'")
        check_number("save_minutes", self.save_minutes, positive=True, optional=True)
        check_number("dist_timeout_minutes", self.dist_timeout_minutes, positive=True)
        check_int("save_total_limit", self.save_total_limit, 1, optional=True)
        return self

    def checkpointing_on(self, device_type: str) -> bool:
        """gradient_checkpointing as resolved for a device type ("cuda", "cpu"): whether any layer is checkpointed."""
        if self.checkpoint_layers is not None:
            return self.checkpoint_layers > 0
        if self.gradient_checkpointing is None:
            return bool(self.lora_r) and device_type == "cuda"
        return self.gradient_checkpointing

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {name: values[name] for name in field_names()}


def resolved_checkpoint_layers(config: TrainConfig, num_layers: int, device_type: str = "cuda") -> int:
    """How many decoder layers (the first ones) of a `num_layers`-layer model `config` checkpoints on
    `device_type`; ValueError naming checkpoint_layers when it exceeds num_layers, or naming offload_activations
    when no layer is checkpointed."""
    if config.checkpoint_layers is not None and config.checkpoint_layers > num_layers:
        raise ValueError(f"checkpoint_layers {config.checkpoint_layers} exceeds the model's {num_layers} decoder "
                         f"layers; set at most {num_layers}")
    layers = config.checkpoint_layers if config.checkpoint_layers is not None else (
        num_layers if config.checkpointing_on(device_type) else 0)
    if config.offload_activations and layers == 0:
        raise ValueError("offload_activations moves checkpointed layers' inputs, but no layer is checkpointed; set "
                         "checkpoint_layers (or gradient_checkpointing) or unset offload_activations")
    return layers


def field_names(config_class=TrainConfig) -> list[str]:
    """The fields of a config dataclass in the order they are shown (flags, valid keys, config.yaml): its own
    first, as declared, then those of the option classes it subclasses (train/options.py)."""
    names = [f.name for f in dataclasses.fields(config_class)]
    own = [name for name in config_class.__dict__.get("__annotations__", {}) if name in names]
    return own + [name for name in names if name not in own]


def field_docs(config_class=TrainConfig) -> dict[str, str]:
    """The docstring under each field of the dataclass `config_class` or of the dataclasses it subclasses (for
    the CLI's help), whitespace folded; a subclass's docstring wins."""
    docs: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        docs.update({node.target.id: " ".join(doc.value.value.split())
                     for node, doc in zip(body, body[1:])
                     if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr)
                     and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)})
    return docs


def check_keys(config_class, values: dict, where: str) -> None:
    """ValueError listing the keys of `values` that are not fields of the dataclass `config_class`."""
    names = field_names(config_class)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; valid keys: {', '.join(names)}")


def coerce_floats(config_class, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with the float fields of `config_class` given as integers or numeric strings (YAML reads "2e-6"
    as a string) made floats; anything else is left for validation to name."""
    out = dict(values)
    for f in dataclasses.fields(config_class):
        value = out.get(f.name)
        if "float" not in f.type or isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[f.name] = float(value)
        elif isinstance(value, str):
            try:
                out[f.name] = float(value)
            except ValueError:
                pass
    return out


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key in ("lora_target_modules", "report_to"):
        if isinstance(out.get(key), str):
            out[key] = [m.strip() for m in out[key].split(",") if m.strip()]
    return coerce_floats(TrainConfig, out)


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML config file, its keys' dashes read as underscores (TrainConfig's or OnlineConfig's
    field names); an option given twice, in one spelling or both, is a ValueError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value")
    spellings: dict[str, list[str]] = {}
    for key in values:
        spellings.setdefault(str(key).replace("-", "_"), []).append(str(key))
    twice = {name: keys for name, keys in spellings.items() if len(keys) > 1}
    if twice:
        listed = "; ".join(f"{name} as {' and '.join(repr(k) for k in keys)}" for name, keys in twice.items())
        raise ValueError(f"config file {str(path)!r} sets an option twice ({listed}); keep one")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def resolve_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, *,
                   validate: bool = True) -> TrainConfig:
    """Defaults < preset (named by the flags, else the file; tiny-demo when neither names a preset nor a model)
    < file values < flag overrides; validated (validate False: the caller validates, e.g. `train`)."""
    file_values, overrides = dict(file_values or {}), dict(overrides or {})
    check_keys(TrainConfig, file_values, "config file")
    check_keys(TrainConfig, overrides, "option")
    preset = overrides.get("preset", file_values.get("preset"))
    if preset is None and overrides.get("model", file_values.get("model")) is None:
        preset = overrides["preset"] = BUNDLED_PRESET
    merged: dict[str, Any] = {}
    if preset is not None:
        check_choice("preset", preset, tuple(PRESETS))
        merged.update(PRESETS[preset])
    merged.update(file_values)
    merged.update(overrides)
    config = TrainConfig(**_coerce(merged))
    return config.validate() if validate else config


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """The resolved config as YAML (atomic)."""
    import yaml

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
