import pytest
import torch
from conftest import tiny_model

from trl_selfdistill.knowledge import DriftMeter
from trl_selfdistill.teacher import ModelTeacher

PROMPTS = ["Q: What is the capital of France?\nA:", "Q: Who wrote Hamlet?\nA:", "Q: Gold?\nA:"]


def naive_kl(reference, model, tokenizer) -> float:
    """KL(reference ‖ model) of the next token after each prompt, one unpadded prompt at a time, full logits."""
    kls = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            p = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
            q = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            kls.append((p.exp() * (p - q)).sum())
    return torch.stack(kls).mean().item()


def perturb(module, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn_like(param))


def test_drift_matches_the_definition(tokenizer):
    initial, model = tiny_model(), tiny_model()
    meter = DriftMeter(PROMPTS, tokenizer, batch_size=2)  # prompts of different lengths share a padded batch
    meter.snapshot(model)
    assert meter(model) == pytest.approx(0.0, abs=1e-6)
    perturb(model)
    assert meter(model) == pytest.approx(naive_kl(initial, model, tokenizer), rel=1e-4)
    assert meter(model) > 1e-4


def test_drift_keeps_the_initial_head_when_it_trains(tokenizer):
    model = tiny_model()
    meter = DriftMeter(PROMPTS, tokenizer)
    meter.snapshot(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # an in-place update, as an optimizer makes
    assert meter(model) > 1e-4


def test_drift_against_a_teacher_equals_the_snapshot(tokenizer):
    model = tiny_model()
    teacher = ModelTeacher.copy_of(model)
    with_teacher, with_snapshot = DriftMeter(PROMPTS, tokenizer), DriftMeter(PROMPTS, tokenizer)
    with_teacher.snapshot(model, teacher)
    with_snapshot.snapshot(model)
    perturb(model.model)
    assert with_teacher(model) == pytest.approx(with_snapshot(model), rel=1e-5)
    assert with_teacher(model) > 1e-4


def test_drift_needs_a_reference(tokenizer):
    with pytest.raises(ValueError, match="call `snapshot"):
        DriftMeter(PROMPTS, tokenizer)(tiny_model())


def naive_representation_drift(reference, model, tokenizer, prompts, subjects, layer) -> float:
    """1 − cos of layer `layer`'s state at the subject's last token, one unpadded prompt at a time."""
    drifts = []
    with torch.no_grad():
        for prompt, subject in zip(prompts, subjects, strict=True):
            cut = prompt.rfind(subject) + len(subject)
            index = len(tokenizer(prompt[:cut]).input_ids) - 1  # the subject ends a word: no token straddles it
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            a = reference(ids, output_hidden_states=True).hidden_states[layer][0, index].double()
            b = model(ids, output_hidden_states=True).hidden_states[layer][0, index].double()
            drifts.append(1 - torch.nn.functional.cosine_similarity(a, b, dim=0))
    return torch.stack(drifts).mean().item()


def test_representation_drift_matches_the_definition_at_the_subjects_last_token(tokenizer):
    from trl_selfdistill.knowledge.drift import RepresentationDrift

    subjects = ["France", "Hamlet", "Gold"]
    initial, model = tiny_model(), tiny_model()
    layer = model.config.num_hidden_layers // 2
    meter = RepresentationDrift(PROMPTS, subjects, tokenizer, batch_size=2)
    meter.snapshot(model)
    assert meter(model) == pytest.approx(0.0, abs=1e-6)
    perturb(model)
    want = naive_representation_drift(initial, model, tokenizer, PROMPTS, subjects, layer)
    assert meter(model) == pytest.approx(want, rel=1e-4) and want > 1e-4


def test_representation_drift_ignores_layers_above_the_middle(tokenizer):
    from trl_selfdistill.knowledge.drift import RepresentationDrift

    model = tiny_model()
    meter = RepresentationDrift(PROMPTS, ["France", "Hamlet", "Gold"], tokenizer)
    meter.snapshot(model)
    layers = model.model.layers
    for upper in layers[len(layers) // 2 :]:
        perturb(upper)
    assert meter(model) == pytest.approx(0.0, abs=1e-6)
    perturb(layers[0])
    assert meter(model) > 1e-4
    with pytest.raises(ValueError, match="names its subject"):
        RepresentationDrift(PROMPTS, ["Paris", "", "Silver"], tokenizer)
