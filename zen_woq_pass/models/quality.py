"""What quantization costs a real model, in the measures llama.cpp's perplexity tool reports.

Perplexity on a fixed English text, and agreement with a reference model's next-token
distributions (top-1 agreement, mean KL divergence with the reference as P). The text ships with
the package: the GNU GPL v3, whose licence permits verbatim copies, so every machine scores the
same tokens with no download. One forward pass per window serves every measure: ``window_logits``
keeps the logits, ``perplexity_from_logits`` and ``agreement`` read them.
"""

from __future__ import annotations

import math
from importlib import resources

import torch

EVALUATION_TEXT = "GPL-3.txt"
ROWS = 256  # rows of [T', vocab] logits per float64 step: bounds the memory of the reductions


def evaluation_text() -> str:
    """The evaluation text shipped in ``zen_woq_pass/models/data`` (about 7,700 SmolLM2 tokens)."""
    return (resources.files("zen_woq_pass.models") / "data" / EVALUATION_TEXT).read_text(encoding="utf-8")


def _windows(input_ids: torch.Tensor, window: int, bos_id: int | None):
    """Non-overlapping windows of ``window`` tokens, each as (model input [1, n], targets [n - 1]).

    With ``bos_id`` the window is preceded by BOS and every token in it is predicted; without, the
    first token of each window is context only."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {list(input_ids.shape)}")
    for start in range(0, input_ids.shape[1], window):
        chunk = input_ids[:, start : start + window]
        if bos_id is not None:
            chunk = torch.cat([chunk.new_full((1, 1), bos_id), chunk], dim=1)
        if chunk.shape[1] >= 2:
            yield chunk, chunk[0, 1:]


def window_targets(input_ids: torch.Tensor, window: int = 512, bos_id: int | None = None) -> torch.Tensor:
    """The tokens ``window_logits`` predicts, in its row order: LongTensor [T']."""
    return torch.cat([targets for _, targets in _windows(input_ids, window, bos_id)])


@torch.no_grad()
def window_logits(model, input_ids: torch.Tensor, window: int = 512, bos_id: int | None = None) -> torch.Tensor:
    """Teacher-forced next-token logits of every predicted position: float32 [T', vocab], row i
    predicting ``window_targets(...)[i]``. Kept so that two models can be compared token by token."""
    rows = [model(inputs).logits[0, :-1].float() for inputs, _ in _windows(input_ids, window, bos_id)]
    return torch.cat(rows)


def perplexity_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean negative log-likelihood of ``targets`` [T'] under ``logits`` [T', vocab])."""
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {targets.shape[0]} targets")
    nll = 0.0
    for start in range(0, logits.shape[0], ROWS):
        log_probs = torch.log_softmax(logits[start : start + ROWS].double(), dim=-1)
        nll -= log_probs.gather(1, targets[start : start + ROWS, None]).sum().item()
    return math.exp(nll / targets.shape[0])


def perplexity(model, input_ids: torch.Tensor, window: int = 512, bos_id: int | None = None) -> float:
    """Perplexity of ``model`` (called as ``model(ids).logits``) over non-overlapping windows."""
    logits = window_logits(model, input_ids, window, bos_id)
    return perplexity_from_logits(logits, window_targets(input_ids, window, bos_id))


def agreement(candidate_logits: torch.Tensor, reference_logits: torch.Tensor) -> tuple[float, float]:
    """(fraction of positions where both models' top-1 token is the same, mean KL(reference ||
    candidate) in nats), over rows of [T', vocab] logits; float64 math."""
    if candidate_logits.shape != reference_logits.shape:
        raise ValueError(f"logits differ in shape: {list(candidate_logits.shape)} vs {list(reference_logits.shape)}")
    same: float = 0  # .item() is typed int | float
    kl = 0.0
    for start in range(0, reference_logits.shape[0], ROWS):
        q_log = torch.log_softmax(candidate_logits[start : start + ROWS].double(), dim=-1)
        p_log = torch.log_softmax(reference_logits[start : start + ROWS].double(), dim=-1)
        same += (q_log.argmax(-1) == p_log.argmax(-1)).sum().item()
        p = p_log.exp()
        kl += torch.where(p > 0, p * (p_log - q_log), 0.0).sum().item()  # 0 log 0 = 0
    rows = reference_logits.shape[0]
    return same / rows, kl / rows
