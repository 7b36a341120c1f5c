"""Naive fp64 full-vocabulary divergences, written from the definitions: the reference for the chunked path."""

import torch


def logits(hidden, weight, bias=None, scale=1.0, softcap=None):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def divergence(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """Per-row D(teacher, student): β=0 KL(t‖s), β=1 KL(s‖t), else β·KL(t‖m) + (1-β)·KL(s‖m), m = β·t + (1-β)·s."""
    log_s = torch.log_softmax(student_logits / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if beta == 0.0:
        return (p_t * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (p_s * (log_s - log_t)).sum(-1)
    log_m = torch.log(beta * p_t + (1 - beta) * p_s)
    return beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
