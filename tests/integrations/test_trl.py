"""`sdpo_fast.integrations.trl.use_sdpo_loss` against TRL's own SDPOTrainer: one training step with and without
it gives the same loss and gradients (fp32), with lower peak memory on a vocabulary-heavy model."""
import copy

import pytest
import torch

pytest.importorskip("trl.experimental.sdpo", reason="TRL is not installed (pip install -e '.[trl]')")
from datasets import Dataset  # noqa: E402
from sdpo_fast.train.memory import StorageCounter  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer  # noqa: E402

from sdpo_fast.integrations.trl import use_sdpo_loss  # noqa: E402
from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402


class Capture(TrainerCallback):
    """The gradients of every parameter just before the optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _trainer(model, tmp_path, *, integrate, **config):
    data = Dataset.from_dict({"prompt": ["hello there", "write code"],
                              "privileged_context": ["be brief", "use python"]})
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                   max_completion_length=5, include_environment_feedback=True, max_steps=1, report_to="none",
                   teacher_model_kind="live", use_cpu=True, save_strategy="no", learning_rate=0.0, seed=0,
                   gradient_checkpointing=False, temperature=0.9, bf16=False)
    options.update(config)
    torch.manual_seed(0)
    trainer = SDPOTrainer(model=model, reward_funcs=lambda **kw: [0.0] * len(kw["prompts"]),
                          args=SDPOConfig(**options), train_dataset=data, processing_class=tiny_tokenizer())
    if integrate:
        use_sdpo_loss(trainer, backend="torch")
    capture, losses, batches = Capture(), [], []
    trainer.add_callback(capture)
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        batches.append(inputs)
        loss = compute_loss(model, inputs, *args, **kwargs)
        losses.append(loss.detach())
        return loss

    trainer.compute_loss = recording
    return trainer, capture, losses, batches


CONFIGS = [
    dict(distillation_mode="sampled_token"),
    dict(distillation_mode="sampled_token", steps_per_generation=2, distillation_is_clip=0.5),
    dict(distillation_mode="full_logits", distillation_alpha=0.5),
    dict(distillation_mode="full_logits", distillation_alpha=0.0, steps_per_generation=2, distillation_is_clip=0.9),
    dict(distillation_mode="topk_logits", distillation_topk=7, distillation_add_tail=True, distillation_alpha=1.0),
    dict(distillation_mode="topk_logits", distillation_topk=7, distillation_add_tail=False, distillation_alpha=0.25),
]


def _fp64_truth(trainer, inputs):
    """TRL's own loss and gradients on the captured batch with the model in fp64 (learning rate 0: the weights
    are the step's)."""
    trainer.model.double().zero_grad()
    inputs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in inputs.items()}
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}


def _error(got, truth):
    return (got.double() - truth).abs().max().item()


def _loss_sensitivity(model, inputs) -> float:
    """fp32 eps x the mean |log pi(y_t)| over the completion tokens (fp64 forward): the loss -A_t log pi(y_t)
    moves by |log pi| times any rounding of A_t = log q - log pi, so this is the scale of its fp32 error."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    width = inputs["completion_ids"].shape[1]
    logprobs = logits[:, -width - 1:-1].log_softmax(-1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    used = inputs["completion_mask"].bool()
    return torch.finfo(torch.float32).eps * logprobs[used].abs().mean().item()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_one_step_same_loss_and_gradients(config, tmp_path):
    """Same completions, and our loss and gradients as close to the fp64 truth as TRL's own fp32 ones (x2, plus
    a few fp32 eps of the loss's sensitivity, or 1e-6 of the gradient's scale)."""
    _assert_same_step(tiny_causal_lm(hidden_size=32, num_layers=1, seed=3), config, tmp_path)


def _assert_same_step(model, config, tmp_path):
    results = []
    for integrate in (False, True):
        trainer, capture, losses, batches = _trainer(copy.deepcopy(model), tmp_path / str(integrate),
                                                     integrate=integrate, **config)
        trainer.train()
        results.append((capture.grads, losses, batches, trainer))
    (want_grads, want_losses, want_batches, plain), (grads, losses, batches, _) = results
    assert len(losses) == len(want_losses) == 1
    assert torch.equal(batches[0]["completion_ids"], want_batches[0]["completion_ids"])
    if "distillation_is_clip" in config:
        assert batches[0].get("old_per_token_logps") is not None  # the importance-clipping path ran
    truth_loss, truth_grads = _fp64_truth(plain, want_batches[0])
    bound = 2 * _error(want_losses[0], truth_loss) + 4 * _loss_sensitivity(plain.model, want_batches[0])
    assert _error(losses[0], truth_loss) <= bound
    assert grads.keys() == want_grads.keys() == truth_grads.keys()
    for name, truth in truth_grads.items():
        bound = 2 * _error(want_grads[name], truth) + 1e-6 * truth.abs().max().item()
        assert _error(grads[name], truth) <= bound, name


def _headed_model(model_type: str, **overrides):
    """A tiny random model of a family whose logits are transformed after the lm_head (or whose head has a bias)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[model_type](
        vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, initializer_range=0.2, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            torch.nn.init.normal_(model.get_output_embeddings().bias)
    return model.float()


HEADED = {"cohere-scale": ("cohere", dict(logit_scale=0.25)), "granite-scaling": ("granite", dict(logits_scaling=4.0)),
          "phi-bias": ("phi", {}), "gemma2-softcap": ("gemma2", dict(final_logit_softcapping=2.0))}


@pytest.mark.parametrize("head", HEADED)
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]], ids=["sampled", "full"])
def test_logit_heads_same_loss_and_gradients(head, config, tmp_path):
    """Models with a logit scale, a head bias or a logit soft cap: the same step as TRL's own."""
    model_type, overrides = HEADED[head]
    _assert_same_step(_headed_model(model_type, **overrides), config, tmp_path)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2], CONFIGS[4]], ids=["sampled", "full", "topk"])
def test_lower_peak_memory_on_a_large_vocabulary(config, tmp_path):
    """The loss and backward of one captured batch, storages counted: TRL's logits vs hidden states."""
    model = tiny_causal_lm(hidden_size=16, num_layers=1, vocab_size=50_000, seed=1)
    peaks = []
    for integrate in (False, True):
        trainer, _, _, batches = _trainer(copy.deepcopy(model), tmp_path / str(integrate), integrate=integrate,
                                          max_completion_length=16, **config)
        trainer.train()
        inputs = batches[0]
        trainer.model.zero_grad()
        counter = StorageCounter()
        with counter:
            trainer.compute_loss(trainer.model, inputs).backward()
        peaks.append(counter.peak)
    logits_bytes = batches[0]["completion_ids"].numel() * 50_000 * 4
    assert peaks[1] < peaks[0] - logits_bytes, peaks


def test_unserved_configurations_raise(tmp_path):
    model = tiny_causal_lm(hidden_size=16, num_layers=1)
    trainer, *_ = _trainer(model, tmp_path, integrate=False, distillation_weight=0.5)
    with pytest.raises(ValueError, match="distillation_weight"):
        use_sdpo_loss(trainer)
    trainer, *_ = _trainer(model, tmp_path, integrate=True)
    trainer.args.distillation_weight = 0.0
    with pytest.raises(ValueError, match="distillation_weight"):
        trainer.train()
    with pytest.raises(TypeError, match="SDPOTrainer"):
        use_sdpo_loss(object())


def test_an_adapter_on_the_lm_head_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_causal_lm(hidden_size=16, num_layers=1),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    trainer, *_ = _trainer(model, tmp_path, integrate=False)
    with pytest.raises(ValueError, match="lm_head"):
        use_sdpo_loss(trainer)
