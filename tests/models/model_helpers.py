"""Shared pieces of the model tests: routed inputs, small SAEs, and the comparison with the dense oracle."""

import torch

from sae_dist.config import SAEConfig
from sae_dist.models import build_sae
from sae_dist.models.auxk import dead_candidates
from tests.reference import naive_forward


def routed_inputs(d: int, num_experts: int, tokens_per_expert: list[int], seed: int = 0):
    """Tokens that go to chosen experts: router rows are scaled basis vectors; experts listed with 0 get none."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for expert, count in enumerate(tokens_per_expert):
        x = 0.3 * torch.randn(count, d, generator=g)
        x[:, expert] += 6.0
        xs.append(x)
    x_TD = torch.cat(xs)
    return x_TD[torch.randperm(x_TD.shape[0], generator=g)]


def make_switch(
    num_experts: int,
    latents: int,
    k: int,
    d: int,
    kind="switch",
    auxk_alpha=None,
    dtype=torch.float64,
    formulation=("auto", "auto"),
):
    """A Switch (or dense TopK) SAE with a router that sends a token with a large coordinate e to expert e.

    `formulation` is (sae.encoder_backward_kernel, sae.decoder_kernel)."""
    encoder_backward, decoder = formulation
    cfg = SAEConfig(kind=kind, num_latents=latents, num_experts=num_experts, k=k, auxk_alpha=auxk_alpha, auxk_k=5,
                    encoder_backward_kernel=encoder_backward, decoder_kernel=decoder)
    sae = build_sae(cfg, d_model=d, seed=3).to(dtype)
    with torch.no_grad():
        sae.b_pre.copy_(0.1 * torch.randn(d))
        if sae.router is not None:
            sae.router.weight.zero_()
            sae.router.weight[:, :num_experts] += 4.0 * torch.eye(num_experts)
            sae.router.weight.add_(0.01 * torch.randn_like(sae.router.weight))
        if sae.experts.b_enc is not None:
            sae.experts.b_enc.normal_(0, 0.1)
    return sae


def top_e_switch(experts_per_token: int, union_topk: bool = False, **kwargs):
    """`make_switch` routing each token to `experts_per_token` experts (`union_topk`: one TopK over their union), its
    router softened so that every chosen expert's gate matters (logits of a few units)."""
    sae = make_switch(**kwargs)
    sae.cfg.experts_per_token = sae.router.experts_per_token = experts_per_token
    sae.cfg.union_topk = union_topk
    with torch.no_grad():
        sae.router.weight.mul_(0.05)
    return sae


def make_transcoder(kind: str, d_out: int, skip: bool, num_experts: int = 4, latents: int = 64, k: int = 3,
                    d: int = 12, auxk_alpha=None, formulation=("auto", "auto")):
    """`make_switch` as a transcoder from d to `d_out` (any kind; ReLU and BatchTopK too), with b_in, b_out and
    (with `skip`) W_skip away from their initial values, so that every path carries a gradient."""
    encoder_backward, decoder = formulation
    num_experts = num_experts if kind in ("switch", "batchtopk") else 1
    cfg = SAEConfig(kind=kind, num_latents=latents, num_experts=num_experts, k=k, auxk_alpha=auxk_alpha, auxk_k=5,
                    encoder_backward_kernel=encoder_backward, decoder_kernel=decoder, d_out=d_out,
                    skip=skip)
    sae = build_sae(cfg, d_model=d, seed=3).to(torch.float64)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.b_in.copy_(0.1 * torch.randn(d, generator=g))
        sae.b_out.copy_(0.1 * torch.randn(d_out, generator=g))
        if skip:
            sae.w_skip.copy_(0.1 * torch.randn(d_out, d, generator=g))
        if getattr(sae, "router", None) is not None:
            sae.router.weight.zero_()
            sae.router.weight[:, :num_experts] += 4.0 * torch.eye(num_experts)
            sae.router.weight.add_(0.01 * torch.randn(sae.router.weight.shape, generator=g))
        b_enc = sae.b_enc if kind == "relu" else sae.experts.b_enc
        if b_enc is not None:
            b_enc.copy_(0.1 * torch.randn(b_enc.shape, generator=g))
    return sae


def transcoder_target(x_TD, d_out: int, seed: int = 7):
    """A target y [T, d_out] that depends on x nonlinearly (tanh of a random map), plus noise."""
    g = torch.Generator().manual_seed(seed)
    mix_DO = torch.randn(x_TD.shape[1], d_out, generator=g, dtype=x_TD.dtype)
    return torch.tanh(x_TD @ mix_DO / 3) * 2 + 0.1 * torch.randn(x_TD.shape[0], d_out, generator=g, dtype=x_TD.dtype)


def assert_same_forward_and_grads(sae, x_TD, dead_mask_L=None, grad_atol=1e-6, y_TD=None):
    """Forward, loss terms, encode() and every gradient of `sae` equal the dense-then-mask oracle's; AuxK over the
    latents where `dead_mask_L` [L] is True; the loss against `y_TD` (a transcoder's target; default x)."""
    aux = None if dead_mask_L is None else dead_candidates(dead_mask_L, sae.num_local_experts)
    out = sae(x_TD, aux_candidates=aux)
    terms = sae.loss_terms(x_TD if y_TD is None else y_TD, out)
    ref_x_hat, ref_f, ref_terms = naive_forward(sae, x_TD, dead_mask_L, y_TD=y_TD)
    torch.testing.assert_close(out.x_hat_TD, ref_x_hat, rtol=1e-5, atol=1e-5)
    assert terms.keys() == ref_terms.keys()
    for name in terms:
        torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-5, atol=1e-6)

    latents = sae.encode(x_TD)
    dense_f = torch.zeros_like(ref_f).scatter_add(1, latents.indices_TK, latents.values_TK)
    torch.testing.assert_close(dense_f, ref_f, rtol=1e-5, atol=1e-5)

    weights = sae.loss_weights(0.0)
    loss = sum(weights.get(n, 1.0) * t for n, t in terms.items())
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    ref_loss = sum(weights.get(n, 1.0) * t for n, t in ref_terms.items())
    ref_grads = torch.autograd.grad(ref_loss, list(sae.parameters()))
    for (name, _), g, ref in zip(sae.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=grad_atol, msg=lambda m: f"{name}: {m}")
    return out
