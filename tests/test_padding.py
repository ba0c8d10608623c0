"""Padding-aware balancing losses and statistics: a token mask through LM -> MoE -> losses.

References: transformers' load_balancing_loss_func with attention_mask (Mixtral), SwitchTransformers'
per-group load_balancing_loss_func and router_z_loss_func, torch.var for the unbiased CV^2, and
for every loss the same loss on the batch with the padding removed (float64).

Shape legend: B sequences of S positions, T = B*S tokens, E experts, K top-k, V real tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_lb
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func as switch_lb,
)
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

import moekit
from moekit import ConfigError, MoE, moe_config
from moekit.balance import losses as L
from moekit.lm import LM, LMConfig
from moekit.router import Routing

from capture_util import captured, routed

pytestmark = pytest.mark.usefixtures("one_thread")

B, S, E, K = 3, 7, 6, 2
LENGTHS = [7, 4, 2]  # right padding


def _mask(lengths=LENGTHS, seq=S) -> torch.Tensor:
    """(B, S) long attention mask, 1 on each row's first lengths[b] positions."""
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()


def _noise(seed: int, T: int = B * S) -> tuple[torch.Tensor, torch.Tensor]:
    """(std, standard normal draw), each (T, E) float64, for a noisy top-k routing."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + torch.rand(T, E, generator=g, dtype=torch.float64), torch.randn(T, E, generator=g, dtype=torch.float64)


def _routing(logits_TE: torch.Tensor, k: int = K, score_func: str = "softmax",
             noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> Routing:
    """A token-choice routing of the given logits (top-k of the scores, or of the noisy logits)."""
    scores = torch.softmax(logits_TE, -1) if score_func == "softmax" else torch.sigmoid(logits_TE)
    std = noisy = None
    if noise is not None:
        std = noise[0].to(logits_TE.dtype)
        noisy = logits_TE + noise[1].to(logits_TE.dtype) * std
    choice = scores if noisy is None else noisy
    idx = choice.detach().topk(k, -1).indices
    w = scores.gather(1, idx)
    return Routing(logits_TE=logits_TE, scores_TE=scores, topk_idx_TK=idx, topk_weight_TK=w / w.sum(-1, keepdim=True),
                   noise_std_TE=std, noisy_logits_TE=noisy, score_func=score_func)


def _rows(r: Routing, keep_T: torch.Tensor) -> Routing:
    """The routing of the kept tokens only (the batch with its padding removed)."""
    fields = {k: (v[keep_T] if isinstance(v, torch.Tensor) else v) for k, v in vars(r).items()}
    return Routing(**fields)


def _logits(seed: int = 0, T: int = B * S, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 1.5


# ------------------------------------------------------------------ references


def test_pooled_mixtral_matches_transformers_with_attention_mask():
    mask_BS = _mask()
    logits = [_logits(i, dtype=torch.float32) for i in range(3)]
    routings = [_routing(x) for x in logits]
    ref = mixtral_lb(tuple(logits), E, K, mask_BS)
    ours = L.pooled_mixtral_aux_loss(routings, E, [mask_BS.reshape(-1)] * 3)
    assert abs(float(ours) - float(ref)) < 1e-6
    # Without the mask it is transformers' unmasked value, which differs.
    unmasked = L.pooled_mixtral_aux_loss(routings, E)
    assert abs(float(unmasked) - float(mixtral_lb(tuple(logits), E, K))) < 1e-6
    assert abs(float(unmasked) - float(ref)) > 1e-3
    # One layer: the per-layer mixtral convention is the same function.
    one = L.switch_aux_loss(routings[0], E, "mixtral", mask_BS.reshape(-1))
    assert abs(float(one) - float(mixtral_lb((logits[0],), E, K, mask_BS))) < 1e-6


def test_switch_group_matches_switch_transformers():
    logits_BSE = _logits(1, dtype=torch.float32).view(B, S, E)
    probs_BSE = torch.softmax(logits_BSE, -1)
    ref = switch_lb(probs_BSE, probs_BSE.argmax(-1))
    r = _routing(logits_BSE.reshape(-1, E), k=1)
    ours = L.switch_aux_loss(r, E, "switch_group", batch=B)
    assert abs(float(ours) - float(ref)) < 1e-6
    # One group is the per-layer switch convention.
    torch.testing.assert_close(L.switch_aux_loss(r, E, "switch_group", batch=1), L.switch_aux_loss(r, E, "switch"))
    # Masked: each group's valid tokens, the same as the reference on each unpadded row.
    mask_BS = _mask()
    per_row = [float(switch_lb(probs_BSE[b:b + 1, :n], probs_BSE[b:b + 1, :n].argmax(-1))) for b, n in enumerate(LENGTHS)]
    masked = L.switch_aux_loss(r, E, "switch_group", mask_BS.reshape(-1), batch=B)
    assert abs(float(masked) - sum(per_row) / B) < 1e-6


def test_z_loss_matches_switch_transformers_and_skips_padding():
    logits_BSE = _logits(2, dtype=torch.float32).view(B, S, E)
    assert abs(float(L.z_loss(logits_BSE.reshape(-1, E))) - float(router_z_loss_func(logits_BSE))) < 1e-6
    valid_T = _mask().reshape(-1).bool()
    ref = router_z_loss_func(logits_BSE.reshape(-1, E)[valid_T].view(1, -1, E))
    assert abs(float(L.z_loss(logits_BSE.reshape(-1, E), valid_T)) - float(ref)) < 1e-6


def test_unbiased_cv_squared_is_torch_var_over_mean_squared():
    x = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0], dtype=torch.float64)
    # The widely copied PyTorch port of Shazeer et al.: x.var() / (x.mean() ** 2 + 1e-10), var unbiased.
    assert float(L.cv_squared(x, unbiased=True)) == pytest.approx(float(x.var() / (x.mean() ** 2 + 1e-10)), rel=1e-14)
    assert float(L.cv_squared(x)) == pytest.approx(float(x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)), rel=1e-14)
    # Sample variance = population variance * E / (E - 1).
    assert float(L.cv_squared(x, unbiased=True)) == pytest.approx(float(L.cv_squared(x)) * 6 / 5, rel=1e-14)
    r = _routing(_logits(3))
    expected = sum(float(v.var() / (v.mean() ** 2 + 1e-10)) for v in (L.importance(r, E), L.smooth_load(r, E, K)))
    assert float(L.cv_squared_loss(r, E, K, unbiased=True)) == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------ masked == padding removed


@pytest.mark.parametrize("convention", ["moekit", "switch", "megatron", "mixtral"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_masked_aux_loss_equals_unpadded_batch(convention, score_func):
    valid_T = _mask().reshape(-1).bool()
    r = _routing(_logits(4), score_func=score_func)
    masked = L.switch_aux_loss(r, E, convention, valid_T)
    torch.testing.assert_close(masked, L.switch_aux_loss(_rows(r, valid_T), E, convention), rtol=1e-12, atol=1e-12)
    # 0/1 integers work as well as bools.
    torch.testing.assert_close(L.switch_aux_loss(r, E, convention, valid_T.long()), masked, rtol=0, atol=0)


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_cv_and_z_equal_unpadded_batch(noise, unbiased):
    valid_T = _mask().reshape(-1).bool()
    r = _routing(_logits(5), noise=_noise(5) if noise else None)
    kept = _rows(r, valid_T)
    torch.testing.assert_close(L.importance(r, E, valid_T), L.importance(kept, E), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.smooth_load(r, E, K, valid_T), L.smooth_load(kept, E, K), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.cv_squared_loss(r, E, K, valid_T, unbiased), L.cv_squared_loss(kept, E, K, None, unbiased),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.z_loss(r.logits_TE, valid_T), L.z_loss(kept.logits_TE), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["seq_aux", "switch_group"])
def test_masked_per_sequence_losses_equal_mean_over_unpadded_sequences(loss):
    mask_BS = _mask([7, 4, 0])  # the last row is all padding: left out of the mean
    valid_T = mask_BS.reshape(-1).bool()
    r = _routing(_logits(6), score_func="sigmoid")

    def f(routing: Routing, batch: int, valid: torch.Tensor | None) -> torch.Tensor:
        if loss == "seq_aux":
            return L.sequence_aux_loss(routing, E, batch, valid)
        return L.switch_aux_loss(routing, E, "switch_group", valid, batch)

    rows = [_rows(r, torch.arange(B * S) // S == b) for b in range(2)]
    expected = sum(f(_rows(row, torch.arange(S) < n), 1, None) for row, n in zip(rows, [7, 4])) / 2
    torch.testing.assert_close(f(r, B, valid_T), expected, rtol=1e-12, atol=1e-12)


def test_masked_losses_gradients_equal_unpadded_and_pass_gradcheck():
    """d(masked loss)/d(logits) equals the unpadded batch's gradient on real rows and is 0 on padding."""
    valid_T = _mask().reshape(-1).bool()
    std, eps = _noise(7)

    def losses(logits: torch.Tensor, valid: torch.Tensor | None, batch: int, noise) -> torch.Tensor:
        r = _routing(logits, noise=noise)
        rs = _routing(logits, score_func="sigmoid")
        return (L.switch_aux_loss(r, E, "moekit", valid) + 0.3 * L.z_loss(logits, valid)
                + 0.7 * L.cv_squared_loss(r, E, K, valid) + 0.5 * L.sequence_aux_loss(rs, E, batch, valid)
                + 0.2 * L.switch_aux_loss(rs, E, "switch_group", valid, batch))

    logits = _logits(7).requires_grad_(True)
    losses(logits, valid_T.double(), B, (std, eps)).backward()
    assert float(logits.grad[~valid_T].abs().max()) == 0.0

    # The unpadded batch: the pooled terms over all real tokens, the per-sequence terms per row.
    kept = logits.detach()[valid_T].clone().requires_grad_(True)
    r = _routing(kept, noise=(std[valid_T], eps[valid_T]))
    rs = _routing(kept, score_func="sigmoid")
    ref = L.switch_aux_loss(r, E, "moekit") + 0.3 * L.z_loss(kept) + 0.7 * L.cv_squared_loss(r, E, K)
    start = 0
    for n in LENGTHS:
        row = _rows(rs, (torch.arange(kept.shape[0]) >= start) & (torch.arange(kept.shape[0]) < start + n))
        ref = ref + (0.5 * L.sequence_aux_loss(row, E, 1) + 0.2 * L.switch_aux_loss(row, E, "switch_group")) / B
        start += n
    ref.backward()
    torch.testing.assert_close(logits.grad[valid_T], kept.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: losses(x, valid_T.double(), B, (std, eps)),
                                    (_logits(8).requires_grad_(True),))


# ------------------------------------------------------------------ the layer and the LM


def _moe(**kw) -> MoE:
    cfg = dict(dim=8, num_experts=E, expert_hidden=12, top_k=K, aux_loss_coef=0.01, z_loss_coef=0.001,
               cv_loss_coef=0.1, seq_aux_loss_coef=0.05)
    cfg.update(kw)
    torch.manual_seed(0)
    layer = MoE(moe_config(**cfg)).double().train()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.7)
    return layer


def _moe_like(layer: MoE) -> MoE:
    """A fresh layer (zero statistics) with ``layer``'s config and weights."""
    copy = MoE(layer.config).double().train(layer.training)
    copy.load_state_dict(layer.state_dict())
    return copy


def _per_row(layer: MoE, x_BSD: torch.Tensor, lengths: list[int]) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Each row's real tokens run alone: outputs, and the mean of the per-sequence losses."""
    outs, terms = [], {}
    for b, n in enumerate(lengths):
        outs.append(layer(x_BSD[b:b + 1, :n]))
        for k, v in layer.last_losses.items():
            terms[k] = terms.get(k, 0.0) + float(v) / len(lengths)
    return outs, terms


@pytest.mark.parametrize("router", ["softmax_topk", "noisy_topk", "sigmoid_topk"])
def test_layer_dropless_mask_equals_unpadded(router):
    layer = _moe(router=router, bias_update_rate=1e-3 if router == "sigmoid_topk" else None)
    if router == "noisy_topk":
        layer.eval()  # no noise draw, so the per-row runs see the same routing
    x = torch.randn(B, S, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask_BS = _mask()
    with torch.enable_grad():
        layer.train(router != "noisy_topk")
        out = layer(x, token_mask=mask_BS)
    valid_T = mask_BS.reshape(-1).bool()
    # Unpadded batch as one flat token set: every loss but the per-sequence one.
    flat = _moe(router=router, bias_update_rate=1e-3 if router == "sigmoid_topk" else None)
    flat.load_state_dict(layer.state_dict())
    flat.train(layer.training)
    flat_out = flat(x.reshape(-1, 8)[valid_T])
    torch.testing.assert_close(out.reshape(-1, 8)[valid_T], flat_out)
    rep, flat_rep = layer.report(), flat.report()
    if layer.training:
        for k in ("aux", "z", "cv"):
            torch.testing.assert_close(layer.last_losses[k], flat.last_losses[k], rtol=1e-12, atol=1e-12)
        # The per-sequence loss: the mean over rows of each unpadded row alone.
        _, per_row = _per_row(_moe_like(flat), x, LENGTHS)
        assert float(layer.last_losses["seq_aux"]) == pytest.approx(per_row["seq_aux"], rel=1e-12)
    assert rep.tokens_per_expert == flat_rep.tokens_per_expert
    assert rep.mean_entropy == pytest.approx(flat_rep.mean_entropy, rel=1e-12)
    assert rep.mean_router_z == pytest.approx(flat_rep.mean_router_z, rel=1e-12)
    assert rep.coactivation == flat_rep.coactivation
    assert int(layer.stats.num_tokens) == sum(LENGTHS)
    if router == "sigmoid_topk":
        assert torch.equal(layer.bias_load_E, flat.bias_load_E)
        assert int(layer.bias_load_E.sum()) == sum(LENGTHS) * K


@pytest.mark.parametrize("router,kw", [("softmax_topk", {"capacity_factor": 1.0, "drop_policy": "position"}),
                                       ("softmax_topk", {"capacity_factor": 0.5}),
                                       ("expert_choice", {"capacity_factor": 1.0, "top_k": 1})])
def test_layer_capacity_mask_routes_real_tokens_only(router, kw):
    """With a capacity, padding takes no slot: real tokens get what the unpadded batch gets."""
    kw["seq_aux_loss_coef"] = 0.0  # per sequence: compared with each row alone in the dropless test
    layer = _moe(router=router, **kw)
    x = torch.randn(B, S, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask_BS = _mask()
    valid_T = mask_BS.reshape(-1).bool()
    x.requires_grad_(True)
    out, event = routed(layer, x, token_mask=mask_BS)
    flat = _moe(router=router, **kw)
    flat.load_state_dict(layer.state_dict())
    x_flat = x.detach().reshape(-1, 8)[valid_T].clone().requires_grad_(True)
    flat_out = flat(x_flat)
    torch.testing.assert_close(out.reshape(-1, 8)[valid_T], flat_out)
    assert float(out.detach().reshape(-1, 8)[~valid_T].abs().max()) == 0.0
    for k in flat.last_losses:
        torch.testing.assert_close(layer.last_losses[k], flat.last_losses[k], rtol=1e-12, atol=1e-12)
    rep, flat_rep = layer.report(), flat.report()
    assert (rep.tokens_per_expert, rep.dropped) == (flat_rep.tokens_per_expert, flat_rep.dropped)
    assert rep.mean_entropy == pytest.approx(flat_rep.mean_entropy, rel=1e-12)
    # Gradients reach x through the real tokens only, as in the unpadded run.
    (out.square().sum() + layer.aux_loss).backward()
    (flat_out.square().sum() + flat.aux_loss).backward()
    torch.testing.assert_close(x.grad.reshape(-1, 8)[valid_T], x_flat.grad)
    assert float(x.grad.reshape(-1, 8)[~valid_T].abs().max()) == 0.0
    # The captured routing and plan index the T tokens of the padded batch.
    assert event.routing.num_tokens == B * S
    assert bool(valid_T[event.plan.token_idx_R].all()) and torch.equal(event.valid_T, valid_T)


def test_layer_all_ones_mask_is_the_unmasked_forward():
    layer = _moe()
    x = torch.randn(B, S, 8, dtype=torch.float64)
    out = layer(x)
    losses = dict(layer.last_losses)
    out_masked = layer(x, token_mask=torch.ones(B, S, dtype=torch.bool))
    torch.testing.assert_close(out_masked, out, rtol=0, atol=0)
    for k, v in losses.items():
        torch.testing.assert_close(layer.last_losses[k], v, rtol=1e-14, atol=1e-14)


def test_layer_mask_errors_name_the_problem():
    layer = _moe()
    x = torch.randn(B, S, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"token_mask of shape \(3, 6\) does not match the input's leading shape \(3, 7\)"):
        layer(x, token_mask=torch.ones(B, S - 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_mask must be bool or integer 0/1, got dtype torch.float32"):
        layer(x, token_mask=torch.ones(B, S))
    cap = _moe(capacity_factor=1.0)
    with pytest.raises(ValueError, match="token_mask marks no token as real"):
        cap(x, token_mask=torch.zeros(B, S, dtype=torch.bool))
    with pytest.raises(ConfigError, match="cv_unbiased"):
        moe_config(dim=8, num_experts=4, expert_hidden=8, cv_unbiased=1)


def _lm(convention: str, **moe_kw) -> LM:
    moe = moe_config(dim=32, num_experts=E, expert_hidden=24, top_k=K, aux_loss_convention=convention,
                     aux_loss_coef=0.02, **moe_kw)
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, ffn_hidden=48, max_seq_len=16, moe=moe,
                       first_dense_layers=1)).train()


def test_lm_mixtral_aux_loss_with_padding_matches_transformers():
    model = _lm("mixtral")
    ids = torch.randint(0, 50, (B, S), generator=torch.Generator().manual_seed(0))
    mask_BS = _mask()
    logits, cap = captured(model, ids, token_mask=mask_BS)
    gate_logits = tuple(cap.last(name).routing.logits_TE for name in cap.names)
    ref = mixtral_lb(gate_logits, E, K, mask_BS)
    ours = moekit.aux_loss(model) / 0.02
    assert abs(float(ours.detach()) - float(ref)) < 1e-6
    unmasked_ref = mixtral_lb(gate_logits, E, K)
    assert abs(float(ours.detach()) - float(unmasked_ref)) > 1e-3
    # Right padding: the real tokens' logits do not depend on the mask.
    torch.testing.assert_close(model(ids)[mask_BS.bool()], logits[mask_BS.bool()])
    with pytest.raises(ValueError, match=r"token_mask of shape \(3, 6\) does not match input_ids \(3, 7\)"):
        model(ids, token_mask=mask_BS[:, :-1])


def test_lm_sequence_loss_with_padding_equals_each_sequence_alone():
    model = _lm("moekit", seq_aux_loss_coef=0.1).double()
    ids = torch.randint(0, 50, (B, S), generator=torch.Generator().manual_seed(1))
    model(ids, token_mask=_mask())
    padded = {name: {k: float(v) for k, v in m.last_losses.items()} for name, m in moekit.moe_layers(model)}
    alone: dict[str, dict[str, float]] = {}
    for b, n in enumerate(LENGTHS):
        model(ids[b:b + 1, :n])
        for name, m in moekit.moe_layers(model):
            alone.setdefault(name, {"seq_aux": 0.0})["seq_aux"] += float(m.last_losses["seq_aux"]) / B
    for name in padded:
        assert padded[name]["seq_aux"] == pytest.approx(alone[name]["seq_aux"], rel=1e-10)
