"""Routers for the MH-MoE layer: logits, top-k selection and the auxiliary losses.

Dimension legend: S sub-tokens (= tokens * h), C router input width (= d/h), E experts, K top-k.

References: docs/references.md (routing); GShard/Switch load balancing as implemented in torchscale
``component/xmoe/routing.py`` (``top1gating``/``top2gating``); X-MoE [XM] section 3 (low-dimensional
cosine routing with a learnable temperature); ST-MoE router z-loss.

The router always runs in float32 (autocast disabled), as in torchscale's ``use_fp32`` gates and
torchtitan's MoE router: softmax over E in bf16 visibly changes the top-k choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LinearRouter",
    "XMoERouter",
    "RouteResult",
    "build_router",
    "route_top_k",
    "router_z_loss",
    "routing_statistics",
    "losses_from_statistics",
]


def _fp32_region(x: Tensor) -> torch.autocast:
    """A context that turns autocast off on ``x``'s device, so router math stays in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class LinearRouter(nn.Module):
    """Linear router: ``logits = W x`` with ``W`` of shape (E, C), no bias (official MH-MoE code; torchscale ``wg``).

    Returns float32 logits whatever the input dtype (float64 inputs stay float64 for reference tests).
    """

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # BEiT-3 style trunc-normal(0.02) ([B3] released code): small logits, so routing starts near uniform.
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x_SC: Tensor) -> Tensor:
        dtype = torch.float64 if x_SC.dtype == torch.float64 else torch.float32
        with _fp32_region(x_SC):
            return F.linear(x_SC.to(dtype), self.weight.to(dtype))


class XMoERouter(nn.Module):
    """X-MoE router [XM] sec. 3: project to a low dimension, cosine with expert embeddings, temperature.

    ``form="paper"``: ``logits_e = cos(P x, w_e) / tau`` with both sides L2-normalized and ``tau``
    learnable (stored as ``log(1/tau)`` so it stays positive; clamped to ``tau >= 0.01``).
    ``form="torchscale"``: ``logits_e = (P x) . w_e / |w_e|``, i.e. only the expert embeddings are
    normalized and there is no temperature (torchscale ``Top2Gate._cosine``). torchscale also
    rescales ``w`` in place to norm 1.5 on every call; we do not mutate parameters in forward
    (no hidden state changes in forward), which leaves the logits unchanged because ``w`` is normalized anyway.

    Expert embeddings are initialised orthogonal with gain 0.32 as in torchscale. The projection
    width defaults to 16 (torchscale); [MH1] uses 16/h.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        proj_dim: int = 16,
        form: Literal["paper", "torchscale"] = "paper",
        init_temperature: float = 0.07,
    ) -> None:
        super().__init__()
        if form not in ("paper", "torchscale"):
            raise ValueError(f"XMoERouter: form={form!r}; expected 'paper' or 'torchscale'")
        if proj_dim < 1:
            raise ValueError(f"XMoERouter: proj_dim={proj_dim}; expected >= 1")
        if init_temperature <= 0:
            raise ValueError(f"XMoERouter: init_temperature={init_temperature}; expected > 0")
        self.dim = dim
        self.num_experts = num_experts
        self.proj_dim = proj_dim
        self.form = form
        self.init_temperature = init_temperature
        self.proj = nn.Linear(dim, proj_dim, bias=False)
        self.expert_embed = nn.Parameter(torch.empty(num_experts, proj_dim))
        if form == "paper":
            self.log_inv_temperature = nn.Parameter(torch.empty(()))
        else:
            self.register_parameter("log_inv_temperature", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.orthogonal_(self.expert_embed, gain=0.32)
        if self.log_inv_temperature is not None:
            with torch.no_grad():
                self.log_inv_temperature.fill_(math.log(1.0 / self.init_temperature))

    @property
    def temperature(self) -> Tensor | None:
        """Current temperature tau (paper form), or None for the torchscale form."""
        if self.log_inv_temperature is None:
            return None
        return 1.0 / self.log_inv_temperature.detach().clamp(max=math.log(100.0)).exp()

    def forward(self, x_SC: Tensor) -> Tensor:
        dtype = torch.float64 if x_SC.dtype == torch.float64 else torch.float32
        with _fp32_region(x_SC):
            z_SP = F.linear(x_SC.to(dtype), self.proj.weight.to(dtype))
            w_EP = F.normalize(self.expert_embed.to(dtype), p=2.0, dim=1, eps=1e-4)
            if self.form == "torchscale":
                return z_SP @ w_EP.t()
            z_SP = F.normalize(z_SP, p=2.0, dim=1, eps=1e-4)
            scale = self.log_inv_temperature.to(dtype).clamp(max=math.log(100.0)).exp()
            return (z_SP @ w_EP.t()) * scale


def build_router(
    kind: str,
    dim: int,
    num_experts: int,
    *,
    proj_dim: int = 16,
    xmoe_form: Literal["paper", "torchscale"] = "paper",
    init_temperature: float = 0.07,
) -> nn.Module:
    """Router by name: ``"linear"`` or ``"xmoe"`` (kept as a name-to-class map so YAML stays plain)."""
    if kind == "linear":
        return LinearRouter(dim, num_experts)
    if kind == "xmoe":
        return XMoERouter(dim, num_experts, proj_dim=proj_dim, form=xmoe_form, init_temperature=init_temperature)
    raise ValueError(f"router={kind!r}; expected 'linear' or 'xmoe'")


@dataclass
class RouteResult:
    """What the top-k step produces for S sub-tokens (all float32 except ids)."""

    probs_SE: Tensor  # softmax over experts
    expert_ids_SK: Tensor  # int64, chosen experts, first choice first
    gates_SK: Tensor  # gate weights (raw or renormalized chosen probabilities)


def route_top_k(
    logits_SE: Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    selection_bias_E: Tensor | None = None,
) -> RouteResult:
    """Softmax over experts, top-k on the probabilities, gate = chosen probability (official MH-MoE code).

    ``selection_bias_E`` (aux-loss-free balancing, DeepSeek-V3 style) shifts only which experts are
    chosen; gate values remain the unbiased probabilities. ``renormalize`` divides the k gates by
    their sum (torchscale's ``top2gating`` does so; the official MH-MoE code with top-1 does not).
    """
    probs_SE = torch.softmax(logits_SE, dim=-1)
    scores_SE = probs_SE if selection_bias_E is None else probs_SE + selection_bias_E.to(probs_SE.dtype)
    # torch.topk returns the largest first; ties resolve to the lower index as in torch.argmax.
    _, ids_SK = torch.topk(scores_SE, top_k, dim=-1, sorted=True)
    gates_SK = probs_SE.gather(1, ids_SK)
    if renormalize:
        gates_SK = gates_SK / gates_SK.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gates_SK.dtype).eps)
    return RouteResult(probs_SE=probs_SE, expert_ids_SK=ids_SK, gates_SK=gates_SK)


def routing_statistics(
    probs_SE: Tensor, first_ids_S: Tensor, logits_SE: Tensor, valid_S: Tensor | None = None
) -> Tensor:
    """Sums behind the aux losses, as one vector ``[sum_s p_se (E), first-choice counts (E), n, sum_s z_s]``.

    Kept as sums so that expert parallelism can all-reduce them (one differentiable collective) and
    get exactly the single-process losses over all ranks' sub-tokens. Padding rows weigh 0; no
    boolean indexing, so shapes stay static for torch.compile.
    """
    num_experts = probs_SE.shape[-1]
    w_S = torch.ones_like(probs_SE[:, 0]) if valid_S is None else valid_S.to(probs_SE.dtype)
    sum_prob_E = (probs_SE * w_S[:, None]).sum(0)
    count_E = torch.zeros(num_experts, dtype=probs_SE.dtype, device=probs_SE.device).scatter_add(0, first_ids_S, w_S)
    z_S = torch.logsumexp(logits_SE.to(probs_SE.dtype), dim=-1).square()
    return torch.cat([sum_prob_E, count_E, w_S.sum()[None], (z_S * w_S).sum()[None]])


def losses_from_statistics(stats: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(balance, z) from :func:`routing_statistics` (possibly summed over ranks).

    balance is the GShard/Switch loss ``E * sum_e mean_prob_e * frac_first_e`` (1.0 at perfect balance), z the
    ST-MoE z-loss. Averages run over valid (non-padding) sub-tokens only (torchscale averages over padding too,
    a known flaw); counts use FIRST choices only, as torchscale's ``ce`` from ``mask1``.
    """
    E = num_experts
    n = stats[2 * E].clamp(min=1.0)
    balance = E * ((stats[:E] / n) * (stats[E : 2 * E] / n)).sum()
    return balance, stats[2 * E + 1] / n


def router_z_loss(logits_SE: Tensor, valid_S: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` over valid sub-tokens."""
    z_S = torch.logsumexp(logits_SE, dim=-1).square()
    if valid_S is None:
        return z_S.mean()
    w_S = valid_S.to(z_S.dtype)
    return (z_S * w_S).sum() / w_S.sum().clamp(min=1.0)
