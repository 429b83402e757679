"""Attribution: which (layer, component) of a state-space LM the objective depends on, by several methods.

:func:`attribute` returns one tidy table (``layer, component, kind, metric, value, seed``); :func:`weight_scores`
the per-weight tensors behind the weight-level methods, for pruning; :func:`agreement` rank-correlates each
attribution with the damage measured by ablation probes.

Components each method covers (a method gives no rows for the others):

| component | act_norm | taylor, fisher | gblm | grad_x_act, integrated_gradients, conductance (hook) |
|---|---|---|---|---|
| x, z, B, C | yes | yes | yes | yes (x, z, B, C) |
| dt | yes (Mamba-1: x_proj dt rows + dt_proj; Mamba-2: in_proj dt rows) | yes (+ biases) | yes | yes (dt) |
| conv1d | yes (input ``x`` / Mamba-2 ``conv_in``) | yes (+ bias) | yes | yes (conv) |
| out_proj | yes | yes | yes | yes (out) |
| norm (Mamba-2) | no: no weight input | yes | no | yes (out_proj_in) |
| A_log | no | yes | no | no: hook A has no batch axis |
| D | no | yes | no | no: hook y is the whole scan output |
| dt_norm (FalconMamba) | no: weightless | no: weightless | no | yes (dt_low) |
| B_norm, C_norm (FalconMamba) | no: weightless | no: weightless | no | no: they share hooks B, C |
| dt_norm, B_norm, C_norm (Jamba) | no: no weight input | yes | no | dt_norm (dt_low); B_norm, C_norm no |
| q, k, v, o (attention) | yes (``attn_in``, ``o_in``) | yes | yes | yes (q, k, v, attn_out) |
| gate, up, down (MLP) | yes (``mlp_in``, ``down_in``) | yes | yes | yes (gate/up: their projection rows; mlp_out) |
| router, experts, shared_experts (MoE) | no: no input hook | yes | no | no: moe_out is the whole MoE's |

``act_norm`` and ``gblm`` use every weight of the component that has an input hook (``Registry.input_hooks``);
``taylor`` and ``fisher`` every parameter slice (biases, ``dt_bias``, ``A_log``, ``D``, norm weights included).
On hybrids a component gets rows only in the layers holding its unit.
"""

from .._lazy import exports

__all__ = [
    "COLUMNS", "GBLM_ALPHA", "METHODS", "OBJECTIVES", "WEIGHT_METHODS", "AttributeOptions", "AttributionContext",
    "ChannelStats", "ScoreKey", "agreement", "attribute", "channel_stats", "covered_components", "default_methods",
    "kendall_tau_b", "owl_outlier_ratio", "rank_correlation", "spearman", "wanda_score", "weight_scores",
]

_EXPORTS = {
    "owl_outlier_ratio": "..core.scores",
    "wanda_score": "..core.scores",
    "OBJECTIVES": "..core.stats",
    "ChannelStats": "..core.stats",
    "channel_stats": "..core.stats",
    "agreement": ".agreement",
    "kendall_tau_b": ".agreement",
    "rank_correlation": ".agreement",
    "spearman": ".agreement",
    "COLUMNS": ".api",
    "GBLM_ALPHA": ".options",
    "METHODS": ".options",
    "WEIGHT_METHODS": ".api",
    "AttributeOptions": ".options",
    "AttributionContext": ".api",
    "ScoreKey": ".api",
    "attribute": ".api",
    "covered_components": ".api",
    "default_methods": ".options",
    "weight_scores": ".api",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)
