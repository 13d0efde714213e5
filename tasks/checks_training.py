"""The training half of the run's cross-checks (tasks/checks.py runs them): optimizer and scheduler
names, the packages they and `training.sft_args` flags need, SFTConfig built once, the learning-rate
schedule built once, LoRA target modules, and a template that assistant-only loss can use. Each
failure names the field, before any model is loaded."""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path

from tasks.config import RunConfig
from tasks.config_base import ConfigError


@functools.lru_cache(maxsize=4)
def _enum_values(module: str, name: str) -> list[str]:
    """The string values of enum `name` in transformers' `module`, read from its source: importing
    trainer_utils/training_args pulls in torch, accelerate and peft (~6 s here), and every run
    checks these names before anything starts. Only the class's own lines are parsed (the whole
    module takes ~0.3 s). Falls back to the import if the source moved."""
    import ast
    import importlib
    import importlib.util
    import itertools

    spec = importlib.util.find_spec("transformers")  # a submodule's spec would import the package
    source = Path(spec.submodule_search_locations[0]) / f"{module}.py" if spec else None
    text = source.read_text(encoding="utf-8") if source and source.is_file() else ""
    start = text.find(f"\nclass {name}(")
    if start >= 0:
        head, *rest = text[start + 1:].splitlines()
        body = itertools.takewhile(lambda line: not line.strip() or line[0].isspace(), rest)
        node = ast.parse("\n".join([head, *body])).body[0]
        values = [s.value.value for s in node.body if isinstance(s, ast.Assign)
                  and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)]
        if values:
            return values
    return [e.value for e in getattr(importlib.import_module(f"transformers.{module}"), name)]


def check_schedule(cfg) -> None:
    """The optimizer and scheduler names exist in this transformers (ValueError naming the field)."""
    for field, module, enum in (("lr_scheduler_type", "trainer_utils", "SchedulerType"),
                                ("optim", "training_args", "OptimizerNames")):
        value, known = getattr(cfg, field), _enum_values(module, enum)
        if value not in known:
            raise ValueError(f"training.{field}: unknown {value!r}; choose from {', '.join(known)}")


def check_training(config: RunConfig) -> None:
    """Optimizer and scheduler names, the packages they and `training.sft_args` flags need,
    `training.sft_args` against TRL's SFTConfig, the schedule built once, and a possible hub push."""
    from tasks.hub import check_hub
    from tasks.training import sft_overrides

    try:
        check_schedule(config.training)
        overrides = sft_overrides(config.training)
        check_packages(config.training, overrides)
        args = trial_sft_config(config.training, config.execution) if overrides else None
        check_scheduler_builds(config.training, args)
        check_hub(config.output)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def trial_sft_config(cfg, execution=None):
    """Build the run's SFTConfig once, with the run's own device and precision (`execution`), so values
    TRL/transformers refuse together (e.g. bf16 where the device has none, fp16 beside the bf16 that
    precision 'auto' chose) are named now rather than after the model and data are loaded; returns it."""
    import tempfile

    from tasks.device import resolve
    from tasks.training import sft_config

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return sft_config(cfg, tmp, [], resolve(execution) if execution is not None else None)
        except ValueError as err:
            raise ConfigError(f"training.sft_args {cfg.sft_args}: SFTConfig refused them: {err}") from None


# Packages that an SFTConfig flag (set true or to any value) makes the Trainer import only once
# training starts: {sft_args field: (module, pip package)}.
_FLAG_PACKAGES = {
    "use_liger_kernel": ("liger_kernel", "liger-kernel"),
    "deepspeed": ("deepspeed", "deepspeed"),
}
# The same for training.optim (transformers' trainer_optimizer.py): (names or 'prefix_*', module, pip package).
_OPTIM_PACKAGES = (
    (("adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_*",
      "rmsprop_bnb*"), "bitsandbytes", "bitsandbytes"),
    (("galore_*",), "galore_torch", "galore-torch"),
    (("apollo_*",), "apollo_torch", "apollo-torch"),
    (("adamw_torch_4bit", "adamw_torch_8bit"), "torchao", "torchao"),
    (("schedule_free_*",), "schedulefree", "schedulefree"),
    (("lomo", "adalomo"), "lomo_optim", "lomo-optim"),
    (("grokadamw",), "grokadamw", "grokadamw"),
    (("stable_adamw",), "optimi", "torch-optimi"),
    (("adamw_anyprecision",), "torchdistx", "torchdistx"),
    (("adamw_torch_xla",), "torch_xla", "torch_xla"),
    (("adamw_torch_npu_fused",), "torch_npu", "torch-npu"),
)


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_packages(cfg, overrides: dict) -> None:
    """The optional packages that training.optim and sft_args flags (use_liger_kernel, deepspeed)
    need are installed: an ImportError at the Trainer otherwise, after the model is loaded and sampled."""
    import fnmatch

    for name, (module, package) in _FLAG_PACKAGES.items():
        if overrides.get(name) and not _installed(module):
            raise ValueError(f"training.sft_args.{name}: needs the {package} package, which is not installed here; "
                             f"pip install {package} (in the environment that runs the flow), or remove it")
    for patterns, module, package in _OPTIM_PACKAGES:
        if any(fnmatch.fnmatchcase(cfg.optim, p) for p in patterns) and not _installed(module):
            raise ValueError(f"training.optim={cfg.optim!r}: needs the {package} package, which is not installed "
                             f"here; pip install {package} (in the environment that runs the flow), or choose "
                             "another optimizer (e.g. adamw_torch_fused)")


# An example of what each schedule that needs arguments takes, for the error message.
_SCHEDULE_KWARGS = {"cosine_with_min_lr": "{min_lr_rate: 0.1}", "cosine_warmup_with_min_lr": "{min_lr_rate: 0.1}",
                    "warmup_stable_decay": "{num_decay_steps: 10}", "cosine_with_restarts": "{num_cycles: 2}",
                    "polynomial": "{lr_end: 1.0e-7, power: 1.0}"}


def check_scheduler_builds(cfg, args=None) -> None:
    """Build the learning-rate schedule as the Trainer will (transformers' get_scheduler, with
    sft_args.lr_scheduler_kwargs) on a one-parameter optimizer, so a schedule that needs arguments
    (cosine_with_min_lr) or arguments a schedule does not take are named now, not when training
    starts. `args`: the run's SFTConfig when sft_args are set. The default linear schedule without
    arguments always builds: not tried (importing the schedules costs ~4 s)."""
    import math

    kwargs = (getattr(args, "lr_scheduler_kwargs", None) or {}) if args is not None else {}
    if cfg.lr_scheduler_type == "linear" and not kwargs:
        return
    import torch
    from transformers.optimization import get_scheduler

    steps = cfg.max_steps if cfg.max_steps > 0 else 100  # by epochs: any length checks the arguments
    warmup = args.get_warmup_steps(steps) if hasattr(args, "get_warmup_steps") else math.ceil(cfg.warmup_ratio * steps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    try:
        get_scheduler(cfg.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                      scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError, KeyError) as err:
        example = _SCHEDULE_KWARGS.get(cfg.lr_scheduler_type)
        fix = (f"set training.sft_args.lr_scheduler_kwargs to what it takes (e.g. {example})" if example
               else "remove training.sft_args.lr_scheduler_kwargs")
        field = "training.sft_args.lr_scheduler_kwargs" if kwargs else "training.lr_scheduler_type"
        raise ValueError(f"{field}: transformers cannot build the {cfg.lr_scheduler_type!r} schedule with "
                         f"lr_scheduler_kwargs={dict(kwargs)}: {err}; {fix}, or choose another "
                         "training.lr_scheduler_type") from None


def check_lora_targets(config: RunConfig) -> None:
    """training.peft.target_modules name modules the model has (peft says so only once the trainer
    is built, after the model is loaded and sampled). Checked on the model's architecture built
    without weights, when its config is on this machine (the built-in model's: in its GGUF until it
    is converted); else left to peft."""
    peft = config.training.peft
    if peft is None or peft.target_modules == ["all-linear"]:
        return
    from tasks.models import BUILTIN, builtin_gguf, builtin_target, resolve_source

    concrete = resolve_source(config.model)
    if concrete == BUILTIN and not builtin_gguf().is_file():
        return  # check_model names what is missing
    folder = builtin_target() if concrete == BUILTIN else Path(concrete).expanduser()
    # A first run on this machine has no converted built-in model yet: its GGUF holds the config (~7 s
    # to read; a typo once passed here and failed the run after its samples).
    source = {"pretrained_model_name_or_path": folder}
    if not (folder / "config.json").is_file():
        if concrete != BUILTIN:
            return
        source = {"pretrained_model_name_or_path": builtin_gguf().parent, "gguf_file": builtin_gguf().name}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(**source))
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in peft.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        near = {t: m[0] for t in missing if (m := difflib.get_close_matches(t, known, n=1))}
        hint = "; did you mean " + ", ".join(f"{m!r} for {t!r}" for t, m in near.items()) + "?" if near else ""
        raise ConfigError(f"training.peft.target_modules: {missing} match no module of {concrete!r}{hint} "
                          f"(its linear layers: {', '.join(known)}; or ['all-linear'])")


def check_template(config: RunConfig) -> None:
    """template.assistant_only_loss needs a template with {% generation %} markers: the same decision
    the flow's prepare_chat_template makes (tasks/templates.py), made before the model is loaded and
    sampled. With 'model', the model's own template is read when the model is here (else the flow
    checks it once it is). A template file of the user's must end each assistant reply, as the flow
    requires: checked here too, when the model (its tokenizer) is here."""
    cfg = config.template
    from tasks.special_tokens import tokenizer_facts
    from tasks.templates import SHIPPED, TemplateError, effective_template, end_of_turn, template_choice

    name, text = template_choice(cfg.chat_template)  # TemplateError (a ValueError) naming the field
    model_dir = model_dir_here(config.model)
    if text is not None and name not in SHIPPED and model_dir is not None:  # it failed in the flow, after the data
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.chat_template = text
        try:
            end_of_turn(tokenizer, repr(cfg.chat_template))
        except TemplateError as err:
            raise ConfigError(f"template.chat_template={cfg.chat_template!r}: {err}") from None
    if cfg.assistant_only_loss is not True:  # 'auto' falls back to every token where markers are missing
        return
    own = None
    if name == "model":
        if model_dir is None:
            return
        own = tokenizer_facts(model_dir)[1]
    current = text if text is not None else own
    if current and re.search(r"\{%-?\s*generation\s*-?%\}", current):  # TRL's test, without importing TRL (~5 s)
        return
    effective_template(cfg, own)  # switches to ChatML with markers, or says what to change


def model_dir_here(source: str):
    """The model's local directory when it is here without downloading or converting, else None."""

    from tasks.models import BUILTIN, builtin_target, resolve_source

    concrete = resolve_source(source)
    path = builtin_target() if concrete == BUILTIN else Path(concrete).expanduser()
    return path if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file() else None
