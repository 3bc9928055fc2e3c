"""TRL's SFTTrainer on a GoRA model: ``SFTTrainer(model=peft_model)`` without ``peft_config`` trains the GoRA
adapters as built, saves them, and vanilla PEFT reloads the result with identical logits. The estimation batches
come from the trainer's own dataset and collator through ``gora.trainer.estimation_batches``."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel

from gora import GoraConfig, get_gora_model
from gora.trainer import add_gora_logging, estimation_batches

from conftest import tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = "the a movie film good bad great awful plot actor boring fun story love hate was is and".split()
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
STEPS, BATCH = 4, 2


def _tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tokenizer.eos_token = "[SEP]"
    return tokenizer


def _dataset():
    """Pre-tokenised text (SFTTrainer keeps an ``input_ids`` dataset as it is): 16 sentences of 4-10 words."""
    generator = torch.Generator().manual_seed(0)
    tokenizer = _tokenizer()
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=generator).tolist())
             for n in torch.randint(4, 11, (16,), generator=generator)]
    return datasets.Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})


def test_sft_trainer_trains_the_gora_model_and_vanilla_peft_reloads_it(tmp_path):
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer, dataset = _tokenizer(), _dataset()
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)  # what SFTTrainer builds
    batches = estimation_batches(dataset, collator, batch_size=BATCH, num_steps=STEPS, seed=0)
    model = tiny_llama().train()
    assert max(max(ids) for ids in dataset["input_ids"]) < model.config.vocab_size
    peft_model = get_gora_model(model, LoraConfig(**LORA), batches,
                                gora_config=GoraConfig(num_steps=STEPS, show_progress=False))
    state = peft_model.gora_state
    assert len({state.ranks[n] for n in state.adapted}) > 1  # per-layer ranks: a peft_config would flatten them
    initial_b = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}

    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=BATCH,
                     learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     disable_tqdm=True, seed=0)  # TRL's defaults otherwise: bf16 autocast, checkpointing
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.model is peft_model  # the GoRA model itself, not a model TRL wrapped anew
    # the trainer's own dataset and collator give the batches GoRA estimated from
    again = estimation_batches(trainer.train_dataset, trainer.data_collator, batch_size=BATCH, num_steps=STEPS,
                               seed=0, columns=["input_ids"])
    for ours, theirs in zip(batches, again, strict=True):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    callback = add_gora_logging(trainer, state)
    trainer.train()
    assert callback._reported  # gora/* scalars went to the Trainer's logs

    modules = dict(peft_model.base_model.model.named_modules())
    for name in state.adapted:  # TRL kept GoRA's per-layer ranks
        assert modules[name].lora_A["default"].weight.shape[0] == state.ranks[name]
    assert any(not torch.equal(p, initial_b[n]) for n, p in peft_model.named_parameters() if n in initial_b)

    trainer.save_model(str(tmp_path / "adapter"))
    probe = torch.tensor([[5, 9, 12, 7, 3], [6, 6, 14, 20, 3]])
    # SFTConfig defaults to bf16=True: Accelerate wrapped peft_model.forward in a bf16 autocast, which stays after
    # training. The weights are fp32; unwrap to compare in fp32
    assert args.bf16
    trained = trainer.accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        expected = trained(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(input_ids=probe).logits, expected, rtol=0, atol=0)
