"""The peer methods (`trl_selfdistill.peers`): each factory builds a trainer that trains as it states."""

import math

import pytest
import torch
from conftest import FACTS, assert_params_unchanged, config, make_tokenizer, params, tiny_model
from datasets import Dataset

from trl_selfdistill import ForgettingCallback, SelfDistillSFTTrainer
from trl_selfdistill.knowledge.formats import AnswerFormat
from trl_selfdistill.peers import DEFAULTS, PEERS, MatchedL2SFTTrainer, peer_settings, sdft_dataset, tokenize_like_sft


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """The snapshot S as the protocol hands it over: a saved model + tokenizer folder."""
    path = tmp_path_factory.mktemp("snapshot")
    tiny_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def facts_dataset(n: int = 16) -> Dataset:
    """Training rows in the paper's plain format (`AnswerFormat.training_dataset`)."""
    rows = [FACTS[i % len(FACTS)] for i in range(n)]
    facts = Dataset.from_dict({"question": [q for q, _ in rows], "answers": [[a] for _, a in rows]})
    return AnswerFormat().training_dataset(facts)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------------------------------------------------------------
# l2init


def test_l2init_with_zero_coef_is_plain_sft(snapshot, tmp_path):
    tokenizer = make_tokenizer()
    sft_args = config(tmp_path, distill_coef=0.0, max_steps=2)
    sft = SelfDistillSFTTrainer(snapshot, sft_args, train_dataset=facts_dataset(), processing_class=tokenizer)
    sft.train()
    l2 = PEERS["l2init"](snapshot, config(tmp_path, max_steps=2), facts_dataset(), tokenizer, l2init_coef=0.0)
    l2.train()
    assert losses(l2) == losses(sft) and len(losses(sft)) == 2
    assert_params_unchanged(params(sft.model), l2.model)
    assert l2.args.distill_coef == 0 and l2.teacher is None


def test_l2init_penalty_value_and_gradient(snapshot, tmp_path):
    coef = 0.5
    trainer = PEERS["l2init"](snapshot, config(tmp_path), facts_dataset(), make_tokenizer(), l2init_coef=coef)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    start = trainer.initial_weights
    naive = sum(((p.double() - start[n].double()) ** 2).sum() for n, p in trainer.model.named_parameters())
    distance = trainer.squared_distance()
    assert distance.item() == pytest.approx(naive.item(), rel=1e-5)
    (coef * distance).backward()
    for n, p in trainer.model.named_parameters():
        expected = 2 * coef * (p.detach() - trainer.initial_weights[n])
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-8)

    # compute_loss adds exactly μ·Σ(θ−θ₀)² to the SFT loss, and logs it
    trainer.model.zero_grad()
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        with_penalty = trainer.compute_loss(trainer.model, batch)
        trainer.l2init_coef = 0.0
        without = trainer.compute_loss(trainer.model, batch)
    assert (with_penalty - without).item() == pytest.approx(coef * naive.item(), rel=1e-4)
    assert trainer._metrics["train"]["l2init_penalty"][0] == pytest.approx(coef * naive.item(), rel=1e-5)


def test_l2init_keeps_weights_closer_to_the_start(snapshot, tmp_path):
    distances = {}
    for coef in (0.0, 10.0):
        trainer = PEERS["l2init"](snapshot, config(tmp_path, max_steps=3, learning_rate=1e-2, optim="sgd"),
                                  facts_dataset(), make_tokenizer(), l2init_coef=coef)
        trainer.train()
        distances[coef] = trainer.squared_distance().item()
    assert 0 < distances[10.0] < distances[0.0]


def test_l2init_penalty_counts_once_per_optimizer_step(snapshot, tmp_path):
    """Batch 4 in one micro-batch or in two accumulated ones: the same weights after 3 steps (the penalty is not
    counted twice with accumulation)."""
    final = []
    for batch, accumulation in ((4, 1), (2, 2)):
        args = config(tmp_path, max_steps=3, learning_rate=1e-2, optim="sgd", per_device_train_batch_size=batch,
                      gradient_accumulation_steps=accumulation)
        trainer = PEERS["l2init"](snapshot, args, facts_dataset(), make_tokenizer(), l2init_coef=5.0)
        trainer.train()
        final.append(params(trainer.model))
    for name, value in final[0].items():
        torch.testing.assert_close(final[1][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("coef", [-1.0, math.nan, math.inf, "0.1", True])
def test_l2init_refuses_a_bad_coef(snapshot, tmp_path, coef):
    with pytest.raises(ValueError, match="l2init_coef"):
        PEERS["l2init"](snapshot, config(tmp_path), facts_dataset(), make_tokenizer(), l2init_coef=coef)


# ---------------------------------------------------------------------------------------------------------------------
# l2match: the pull's gradient norm is the distillation term's


def _grads(model, loss) -> torch.Tensor:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, trainable)])


@pytest.mark.parametrize("scope", ["all", "completion"])
def test_l2match_pull_has_the_distillation_terms_gradient_norm(snapshot, tmp_path, scope):
    """μ_t = ‖∇ λτ²KL‖ / (2‖θ − θ₀‖), with ∇ λτ²KL measured independently: self-distillation's gradient minus plain
    SFT's on the same batch and weights; the loss is CE + μ_t·Σ(θ−θ₀)², so its gradient is ∇CE + 2μ_t(θ−θ₀)."""
    args = config(tmp_path, distill_coef=1.5, distill_temperature=2.0, distill_scope=scope)
    trainer = MatchedL2SFTTrainer(snapshot, args, train_dataset=facts_dataset(), processing_class=make_tokenizer())
    torch.manual_seed(2)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    items = (batch["labels"][:, 1:] != -100).sum()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    reference = SelfDistillSFTTrainer(snapshot, args, train_dataset=facts_dataset(), processing_class=make_tokenizer())
    reference.model.load_state_dict(model.state_dict())
    reference.model.train()
    reference.current_gradient_accumulation_steps = 1
    sft_args = config(tmp_path, distill_coef=0.0)
    plain = SelfDistillSFTTrainer(snapshot, sft_args, train_dataset=facts_dataset(), processing_class=make_tokenizer())
    plain.model.load_state_dict(model.state_dict())
    plain.model.train()
    ce_grad = _grads(plain.model, plain.compute_loss(plain.model, batch, num_items_in_batch=items))
    distilled = reference.compute_loss(reference.model, batch, num_items_in_batch=items)
    kl_grad = _grads(reference.model, distilled) - ce_grad
    start = torch.cat([trainer.initial_weights[n].flatten() for n, p in model.named_parameters() if p.requires_grad])
    delta = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]) - start
    expected_coef = kl_grad.norm() / (2 * delta.norm())
    assert kl_grad.norm() > 0

    # θ₀ is the teacher's frozen copy of S, not a third copy of the model
    frozen = dict(trainer.teacher.model.named_parameters())
    assert all(trainer.initial_weights[n] is frozen[n] for n, p in model.named_parameters() if p.requires_grad)
    forwards = []
    teacher_forward = trainer.teacher.last_hidden_state
    trainer.teacher.last_hidden_state = lambda inputs: forwards.append(1) or teacher_forward(inputs)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=items)
    assert len(forwards) == 1  # one teacher forward serves the measured pass and the CE pass
    coef = trainer._metrics["train"]["l2match_coef"][-1]
    assert coef == pytest.approx(expected_coef.item(), rel=1e-4)
    assert trainer._metrics["train"]["l2match_kl_grad_norm"][-1] == pytest.approx(kl_grad.norm().item(), rel=1e-4)
    pull = _grads(model, loss) - ce_grad
    torch.testing.assert_close(pull, 2 * coef * delta, rtol=1e-3, atol=1e-6)
    assert pull.norm().item() == pytest.approx(kl_grad.norm().item(), rel=1e-3)
    # one step's metrics logged once: the distillation ones from the measured pass, not from the CE pass
    assert len(trainer._metrics["train"]["kl"]) == len(trainer._metrics["train"]["l2match_coef"]) == 1


def test_l2match_starts_as_sft_and_stays_closer_to_the_start(snapshot, tmp_path):
    """At θ = θ₀ the pull and the KL's gradient are 0: the first step is plain SFT's (the CE pass has SFT's loss and
    normalisation). Over steps it keeps the weights nearer S than SFT."""
    sft = SelfDistillSFTTrainer(snapshot, config(tmp_path, distill_coef=0.0, max_steps=1, optim="sgd"),
                                train_dataset=facts_dataset(), processing_class=make_tokenizer())
    sft.train()
    matched = MatchedL2SFTTrainer(snapshot, config(tmp_path, distill_coef=1.0, max_steps=1, optim="sgd"),
                                  train_dataset=facts_dataset(), processing_class=make_tokenizer())
    matched.train()
    assert losses(matched) == pytest.approx(losses(sft), rel=1e-5)
    for name, value in params(sft.model).items():
        torch.testing.assert_close(dict(matched.model.named_parameters())[name].detach(), value, rtol=1e-5, atol=1e-7)
    distances = {}
    for name, cls, coef in (("sft", SelfDistillSFTTrainer, 0.0), ("matched", MatchedL2SFTTrainer, 50.0)):
        trainer = cls(snapshot, config(tmp_path, distill_coef=coef, max_steps=4, optim="sgd"),
                      train_dataset=facts_dataset(), processing_class=make_tokenizer())
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        distances[name] = sum((p.detach() - start[n]).pow(2).sum().item() for n, p in trainer.model.named_parameters())
    assert 0 < distances["matched"] < distances["sft"]


def test_l2match_refuses_no_distillation_term(snapshot, tmp_path):
    with pytest.raises(ValueError, match="distill_coef"):
        MatchedL2SFTTrainer(snapshot, config(tmp_path, distill_coef=0.0), train_dataset=facts_dataset(),
                            processing_class=make_tokenizer())


# ---------------------------------------------------------------------------------------------------------------------
# gkd


def test_gkd_beta_zero_is_forward_kl():
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 11, dtype=torch.float64), torch.randn(2, 3, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, 4, 5], [1, 2, -100]])
    p_t, logp_t, logp_s = teacher.softmax(-1), teacher.log_softmax(-1), student.log_softmax(-1)
    forward_kl = (p_t * (logp_t - logp_s)).sum(-1)
    expected = forward_kl[labels != -100].mean()
    got = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=0.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_gkd_teacher_is_a_separate_frozen_copy_and_starts_at_zero_kl(snapshot, tmp_path):
    args = config(tmp_path, max_steps=2, learning_rate=1e-3, lr_scheduler_type="constant", seed=3,
                  dataset_kwargs={"kept": True})
    trainer = PEERS["gkd"](snapshot, args, facts_dataset(), make_tokenizer())
    assert args.dataset_kwargs == {"kept": True}  # GKD edits its own copy
    teacher = trainer.teacher_model
    student_storage = {p.data_ptr() for p in trainer.model.parameters()}
    assert teacher is not trainer.model and not any(p.data_ptr() in student_storage for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    for name in ("max_steps", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "seed", "use_cpu",
                 "logging_steps", "output_dir"):
        assert getattr(trainer.args, name) == getattr(args, name), name
    assert (trainer.args.lmbda, trainer.args.beta, trainer.args.seq_kd) == (0.0, 0.0, False)
    before = params(teacher)
    trainer.train()
    first, second = losses(trainer)
    assert abs(first) < 1e-6  # student = teacher at step 1: KL(teacher ‖ student) = 0
    assert math.isfinite(second)
    assert_params_unchanged(before, teacher)


def test_gkd_with_another_teacher_moves_toward_it(snapshot, tmp_path):
    teacher_path = tmp_path / "teacher"
    teacher = tiny_model(seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # a peaked teacher, far from the near-uniform student
    teacher.save_pretrained(teacher_path)
    one_fact = facts_dataset(1).select([0] * 16)  # the same row every step: its KL must fall
    args = config(tmp_path, max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = PEERS["gkd"](snapshot, args, one_fact, make_tokenizer(), teacher_model=str(teacher_path))
    trainer.train()
    kl = losses(trainer)
    assert kl[0] > 1 and kl[-1] < 0.75 * kl[0], kl


def test_gkd_trains_on_the_tokens_sft_trains_on(snapshot, tmp_path):
    tokenizer = make_tokenizer()
    sft = SelfDistillSFTTrainer(snapshot, config(tmp_path, distill_coef=0.0), train_dataset=facts_dataset(),
                                processing_class=tokenizer)
    rows = tokenize_like_sft(facts_dataset(), tokenizer)
    assert rows["input_ids"] == sft.train_dataset["input_ids"]
    gkd = PEERS["gkd"](snapshot, config(tmp_path), facts_dataset(), tokenizer)
    gkd_batch = gkd.data_collator([gkd.train_dataset[i] for i in range(4)])
    sft_batch = sft.data_collator([sft.train_dataset[i] for i in range(4)])
    # Same trained tokens per row (GKD pads on the left, SFT on the right)
    for row in range(4):
        gkd_targets = gkd_batch["input_ids"][row][gkd_batch["labels"][row] != -100]
        sft_targets = sft_batch["input_ids"][row][sft_batch["labels"][row] != -100]
        assert torch.equal(gkd_targets, sft_targets)


# ---------------------------------------------------------------------------------------------------------------------
# sdft


def test_sdft_teacher_sees_the_fact_as_a_one_shot_demonstration():
    fmt = AnswerFormat()
    rows = sdft_dataset(facts_dataset(4))
    template = DEFAULTS["sdft"]["teacher_prompt_template"]
    for row, (question, answer) in zip(rows, FACTS[: len(rows)], strict=True):
        assert row["prompt"] == fmt.prompt_for(question)
        teacher_prompt = template.format(prompt=row["prompt"], privileged_context=row["privileged_context"])
        assert teacher_prompt == fmt.prompt_for(question, shots=[(question, answer)])


def test_sdft_trains_with_a_frozen_base_teacher(snapshot, tmp_path):
    args = config(tmp_path, max_steps=2, learning_rate=1e-3)
    trainer = PEERS["sdft"](snapshot, args, facts_dataset(), make_tokenizer(), max_completion_length=8)
    teacher = trainer.teacher_model
    assert teacher is not trainer.model and not any(p.requires_grad for p in teacher.parameters())
    assert trainer.args.teacher_model_kind == "base" and trainer.args.num_generations == 1
    assert trainer.args.max_steps == 2 and trainer.args.learning_rate == 1e-3
    newline = make_tokenizer()("\n", add_special_tokens=False)["input_ids"][0]
    assert newline in trainer.model.generation_config.eos_token_id
    before_teacher, before_student = params(teacher), params(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sdft/distillation_loss" in h]
    assert len(logs) == 2 and all(h["completions/max_length"] <= 8 for h in logs)
    assert_params_unchanged(before_teacher, teacher)
    assert any(not torch.equal(before_student[n], p) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peers_run_with_the_forgetting_callback(snapshot, tmp_path, peer):
    """What the protocol does with every trainer: attach the callback, train, read the results."""
    from test_knowledge_callback import make_splits

    splits, fmt = make_splits(), AnswerFormat()
    trainer = PEERS[peer](snapshot, config(tmp_path, max_steps=2), fmt.training_dataset(splits.train()),
                          make_tokenizer())
    callback = ForgettingCallback(splits, fmt=fmt, eval_steps=2, drift_size=0, max_new_tokens=4).attach(trainer)
    trainer.train()
    assert [entry["step"] for entry in callback.history] == [0, 2]
    assert (tmp_path / "out" / "forgetting_results.json").is_file()
    assert any("knowledge/heldout_known_accuracy" in h for h in trainer.state.log_history)


# ---------------------------------------------------------------------------------------------------------------------
# Registry and bad inputs


@pytest.mark.parametrize(
    "peer, options, dataset, error, match",
    [
        ("l2init", {"mu": 1.0}, None, TypeError, "l2init_coef"),
        ("gkd", {"temperature": 0.5}, None, TypeError, "beta, lmbda, teacher_model"),
        ("sdft", {"num_generation": 2}, None, TypeError, "num_generations"),
        ("gkd", {}, Dataset.from_dict({"text": ["Q: a\nA: b\n"]}), ValueError, "prompt/completion"),
        ("sdft", {}, Dataset.from_dict({"prompt": [[{"role": "user", "content": "a"}]],
                                        "completion": [[{"role": "assistant", "content": "b"}]]}),
         ValueError, "plain-text"),
        ("sdft", {"stop": "\n\n"}, None, ValueError, "single token"),
    ],
)
def test_peers_refuse_bad_input(snapshot, tmp_path, peer, options, dataset, error, match):
    dataset = facts_dataset() if dataset is None else dataset
    with pytest.raises(error, match=match):
        PEERS[peer](snapshot, config(tmp_path), dataset, make_tokenizer(), **options)


def test_peers_refuse_other_configs(snapshot, tmp_path):
    from trl import SFTConfig

    for factory in PEERS.values():
        with pytest.raises(TypeError, match="SelfDistillConfig"):
            factory(snapshot, config(tmp_path, cls=SFTConfig), facts_dataset(), make_tokenizer())


def test_peer_settings_fill_defaults_and_refuse_unknown():
    assert set(PEERS) == set(DEFAULTS) == {"l2init", "gkd", "sdft"}
    assert peer_settings("l2init", l2init_coef=1.0)["l2init_coef"] == 1.0
    gkd = peer_settings("gkd")
    assert (gkd["lmbda"], gkd["beta"], gkd["ce"]) == (0.0, 0.0, False)
    assert peer_settings("sdft")["teacher_model_kind"] == "base"
    with pytest.raises(KeyError, match="l2init, gkd, sdft"):
        peer_settings("lora")
    with pytest.raises(TypeError, match="l2init_coef"):
        peer_settings("l2init", mu=1.0)
