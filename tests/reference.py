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
    return _of_log_probs(log_s, log_t, beta)


def _of_log_probs(log_s, log_t, beta: float):
    """D(teacher, student) of two distributions given as log-probs over the same bins."""
    p_s, p_t = log_s.exp(), log_t.exp()
    if beta == 0.0:
        return (p_t * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (p_s * (log_s - log_t)).sum(-1)
    log_m = torch.log(beta * p_t + (1 - beta) * p_s)
    return beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)


def cross_entropy(student_logits, targets, dft: bool = False):
    """Per-row -log softmax(z)[y] (0 where y = -100); DFT weights it by p(y), detached."""
    log_p = torch.log_softmax(student_logits, dim=-1)
    valid = targets != -100
    log_p_y = log_p.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    ce = torch.where(valid, -log_p_y, torch.zeros_like(log_p_y))
    return ce * log_p_y.detach().exp() if dft else ce


def topk_divergence(student_logits, teacher_ids, teacher_logps, beta: float, temperature: float):
    """D over k+1 bins: the teacher's cached top-k (log-probs at τ) and the tail; the student merged the same way."""
    log_s = torch.log_softmax(student_logits / temperature, dim=-1)
    s_top = log_s.gather(1, teacher_ids.long())
    s_bins = torch.cat([s_top, torch.log1p(-s_top.exp().sum(-1, keepdim=True))], -1)
    t_top = teacher_logps.double()
    t_bins = torch.cat([t_top, torch.log1p(-t_top.exp().sum(-1, keepdim=True))], -1)
    return _of_log_probs(s_bins, t_bins, beta)
