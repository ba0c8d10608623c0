"""Autoregressive generation with a KV cache: greedy, or sampling with temperature and top-p
(nucleus sampling, Holtzman et al. 2020), seeded through a private ``torch.Generator``.

Shape legend: B batch, S prompt length, V vocabulary.
"""

from __future__ import annotations

import torch

from ..stats import DECODE_UPDATE_EVERY, RoutingStats
from .model import LM, KVCache


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,): argmax when temperature == 0, else a draw from the top-p nucleus."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    return draw(nucleus_probs(logits_BV, temperature, top_p), generator)


def draw(probs_BV: torch.Tensor, generator: torch.Generator | None | list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``probs_BV`` (B, V) (non-negative, each row with a positive finite sum):
    (B,) long, argmax_v p_v / q_v with q_v ~ Exp(1) (the exponential race, Gumbel-max with the
    logarithms taken off; what ``torch.multinomial`` does for one sample, and it gives the same tokens
    from the same generator state, tested). With one generator the whole (B, V) noise comes from it
    in one call, as ``torch.multinomial`` draws it; with a list, row b's noise comes from
    ``generator[b]`` alone, so a row gives the token it gives alone (the serving engine draws a
    batch's rows with their requests' generators at once). ValueError names the rows that are not
    distributions."""
    total_B = probs_BV.sum(dim=-1)
    bad_B = ~(torch.isfinite(total_B) & (total_B > 0)) | (probs_BV.amin(dim=-1) < 0)
    if bool(bad_B.any()):
        raise ValueError(f"rows {bad_B.nonzero().flatten().tolist()} of the probabilities are not distributions "
                         "(a negative, NaN or infinite entry, or a sum of 0)")
    noise_BV = torch.empty_like(probs_BV)
    if isinstance(generator, list):
        if len(generator) != probs_BV.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs_BV.shape[0]} rows; need one per row")
        for noise_V, gen in zip(noise_BV.unbind(0), generator):
            noise_V.exponential_(generator=gen)
    else:
        noise_BV.exponential_(generator=generator)
    return (probs_BV / noise_BV).argmax(dim=-1)


def nucleus_probs(logits_BV: torch.Tensor, temperature: float | torch.Tensor,
                  top_p: float | torch.Tensor) -> torch.Tensor:
    """(B, V) float64 probabilities ``sample_next`` draws from at ``temperature`` > 0: each row is
    computed on its own, so a row of a batch gives the bits it gives alone (the serving engine
    computes a batch's rows at once and draws each with its request's generator). ``temperature``
    and ``top_p`` are numbers or (B,) float64 tensors (one value per row; a row's bits are those of
    its values given as numbers, provided every row's top_p is below 1 or every row's is 1)."""
    # Shifted by the row maximum and in float64, so every temperature > 0 gives a finite distribution:
    # a tiny one (1e-40) sends all but the maximum to -inf, which is greedy decoding.
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(torch.float64).reshape(-1, 1)
    scaled_BV = logits_BV.double()
    probs_BV = torch.softmax((scaled_BV - scaled_BV.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if isinstance(top_p, torch.Tensor):
        top_p = top_p.to(torch.float64).reshape(-1, 1)
        nucleus = bool((top_p < 1.0).any())
        if nucleus and not bool((top_p < 1.0).all()):
            raise ValueError("top_p: a tensor must hold values below 1 in every row or 1 in every row (a row "
                             "with top_p = 1 skips the nucleus cut, which rounding could change)")
    else:
        nucleus = top_p < 1.0
    if nucleus:
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
    ``stop_token``. The model's context limit caps the total length. Routing statistics are
    added DECODE_UPDATE_EVERY forwards at a time while it runs, all of them by the time it returns.
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
    stats = [m for m in model.modules() if isinstance(m, RoutingStats)]
    every = [s.update_every for s in stats]
    for s, n in zip(stats, every):
        s.defer_updates(max(n, DECODE_UPDATE_EVERY))
    cache = KVCache(model.config.n_layers) if use_cache else None
    tokens_BS = prompt_BS
    done_B = torch.zeros(prompt_BS.shape[0], dtype=torch.bool, device=prompt_BS.device)
    step_input = prompt_BS
    try:
        for _ in range(max_new_tokens):
            logits_BSV = model(step_input if use_cache else tokens_BS, cache=cache)
            next_B = sample_next(logits_BSV[:, -1], temperature, top_p, generator)
            tokens_BS = torch.cat([tokens_BS, next_B[:, None]], dim=1)
            step_input = next_B[:, None]
            if stop_token is not None:
                done_B |= next_B == stop_token
                if bool(done_B.all()):
                    break
    finally:
        for s, n in zip(stats, every):
            s.defer_updates(n)  # adds the waiting forwards
        model.train(was_training)
    return tokens_BS
