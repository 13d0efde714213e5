"""EOS: after templating, every assistant turn ends with the token the model stops on, and that
token is inside the loss mask (TRL issue 2059: a model never trained on its EOS never stops).
Checked on the batches the real SFTTrainer builds, for padded and padding-free batching."""

import pytest
from datasets import load_from_disk

from tasks.config import TrainingConfig
from tasks.models import load_model
from tasks.training import prepare_splits, sft_config


@pytest.mark.parametrize("padding_free", [True, False])
def test_every_assistant_turn_ends_in_a_trained_eos(tiny_ref, fixture_data, tmp_path, padding_free):
    from trl import SFTTrainer

    model, tokenizer = load_model(tiny_ref)
    cfg = TrainingConfig(max_steps=1, per_device_train_batch_size=4, max_length=512, padding_free=padding_free)
    splits = load_from_disk(fixture_data.path)
    train, test = prepare_splits(splits, tokenizer, cfg)
    trainer = SFTTrainer(model=model, args=sft_config(cfg, str(tmp_path), []), train_dataset=train,
                         eval_dataset=test, processing_class=tokenizer)
    eos = tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"  # what generation stops on
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assistant = tokenizer.encode("assistant", add_special_tokens=False)

    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"].flatten().tolist(), batch["labels"].flatten().tolist()
    turns = 0
    for i, token in enumerate(ids):
        if token == start and ids[i + 1 : i + 1 + len(assistant)] == assistant:
            end = ids.index(eos, i)  # this assistant turn's closing token
            assert labels[end] == eos, f"EOS at {end} is masked out of the loss"
            assert all(label != -100 for label in labels[i + 1 + len(assistant) : end + 1])
            turns += 1
    # 4 fixture conversations of 2-4 exchanges: every assistant turn was checked
    assert turns >= 8
