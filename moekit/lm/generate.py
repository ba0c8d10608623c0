"""Autoregressive generation with a KV cache: greedy, or sampling with temperature and top-p
(nucleus sampling, Holtzman et al. 2020), seeded through a private ``torch.Generator``.

Shape legend: B batch, S prompt length, V vocabulary.
"""

from __future__ import annotations

import torch

from .model import LM, KVCache


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,): argmax when temperature == 0, else a draw from the top-p nucleus."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    return torch.multinomial(nucleus_probs(logits_BV, temperature, top_p), 1, generator=generator).squeeze(1)


def nucleus_probs(logits_BV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) float64 probabilities ``sample_next`` draws from at ``temperature`` > 0: each row is
    computed on its own, so a row of a batch gives the bits it gives alone (the serving engine
    computes a batch's rows at once and draws each with its request's generator)."""
    # Shifted by the row maximum and in float64, so every temperature > 0 gives a finite distribution:
    # a tiny one (1e-40) sends all but the maximum to -inf, which is greedy decoding.
    scaled_BV = logits_BV.double()
    probs_BV = torch.softmax((scaled_BV - scaled_BV.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the first token is always kept, also for a
        # top_p below rounding (1e-61).
        outside_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= top_p
        outside_BV[:, 0] = False
        sorted_BV = sorted_BV.masked_fill(outside_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(1, order_BV, sorted_BV)
    return probs_BV


@torch.no_grad()
def generate(model: LM, prompt_BS: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, use_cache: bool = True,
             stop_token: int | None = None) -> torch.Tensor:
    """prompt (B, S) long -> (B, S + n) long with n <= max_new_tokens new tokens.

    With ``use_cache=False`` each step recomputes the whole sequence (the reference that tests
    compare the cached path against). Generation stops early once every row produced
    ``stop_token``. The model's context limit caps the total length.
    """
    if prompt_BS.dim() != 2 or prompt_BS.shape[1] == 0:
        raise ValueError(f"prompt must be (B, S) with S >= 1, got shape {tuple(prompt_BS.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    room = model.config.max_seq_len - prompt_BS.shape[1]
    if room < 0:
        raise ValueError(f"prompt of {prompt_BS.shape[1]} tokens exceeds max_seq_len={model.config.max_seq_len}")
    max_new_tokens = min(max_new_tokens, room)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt_BS.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    cache = KVCache(model.config.n_layers) if use_cache else None
    tokens_BS = prompt_BS
    done_B = torch.zeros(prompt_BS.shape[0], dtype=torch.bool, device=prompt_BS.device)
    step_input = prompt_BS
    for _ in range(max_new_tokens):
        logits_BSV = model(step_input if use_cache else tokens_BS, cache=cache)
        next_B = sample_next(logits_BSV[:, -1], temperature, top_p, generator)
        tokens_BS = torch.cat([tokens_BS, next_B[:, None]], dim=1)
        step_input = next_B[:, None]
        if stop_token is not None:
            done_B |= next_B == stop_token
            if bool(done_B.all()):
                break
    model.train(was_training)
    return tokens_BS
