"""LoRA through peft: the adapters' config, and the embedding rows of tokens the chat template added
(LoRA alone never trains them, and a model that never learned its new EOS never stops)."""

from __future__ import annotations

from tasks.config import TrainingConfig


def lora_config(cfg: TrainingConfig, new_tokens: dict | None = None):
    """peft's LoraConfig for training.peft (None: full fine-tuning). `new_tokens` (new_token_rows):
    the embedding rows of tokens the template stage added, trained too."""
    if cfg.peft is None:
        return None
    from peft import LoraConfig

    targets = cfg.peft.target_modules
    return LoraConfig(
        r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout, task_type="CAUSAL_LM",
        target_modules=targets[0] if targets == ["all-linear"] else targets,  # peft's shorthand is a string
        **(new_tokens or {}),
    )


def new_token_rows(model, token_ids: list[int]) -> dict:
    """LoraConfig settings that train the rows of `token_ids` (tokens the template stage added, e.g.
    <|eot_id|> as the EOS: initial values no training has touched), {} if none. LoRA alone leaves the
    embedding as it is, and a model never trained on its new EOS never stops. peft's trainable tokens
    train just those rows of the input embedding; a tied LM head follows it, an untied one gets the
    same rows (its whole weight when it has a bias, which peft's trainable tokens drop)."""
    if not token_ids:
        return {}
    names = {module: name for name, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[embed]: list(token_ids)}
    if head is None or head.weight is embed.weight:
        return {"trainable_token_indices": rows}
    if getattr(head, "bias", None) is not None:
        return {"trainable_token_indices": rows, "modules_to_save": [names[head]]}
    return {"trainable_token_indices": rows | {names[head]: list(token_ids)}}


def head_without_bias(model) -> None:
    """TRL's fused LM head reads `lm_head.bias`, which peft's trainable-tokens wrapper around the head
    (a head tied to the embedding, or new_token_rows' rows of an untied one) does not answer: it
    forwards only `.weight` (AttributeError at the first step). Such a head has no bias
    (new_token_rows trains a head with one whole), so the wrapper's is None."""
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and head.original_module.bias is None:
        head.bias = None
