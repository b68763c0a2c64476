"""AdaLoRA: an SVD-shaped LoRA y += s ((drop(x) A) * E) B whose rank budget shrinks during training, triplets
(A column, E entry, B row) ranked by smoothed sensitivity x uncertainty; plus an orthogonality regulariser.

Imports jax and sibling adapter modules only. Follows PEFT 0.21.2 (`tuners/adalora`): s = alpha / (r_init + 1e-5)
(PEFT's `scaling / (ranknum + 1e-5)`), A, B ~ N(0, 0.02^2), E = 0; the rank allocator runs after every optimizer
step as a training hook (`after_step`) on the step's gradients (before clipping) and the updated weights. Ranks
stay in a fixed r_init stack (the layers are scanned): a pruned triplet has E = 0 and a False entry in the rank
mask, which PEFT export turns into its `rank_pattern` (and import pads back).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.lora import DEFAULT_TARGETS
from jaxpeft.adapters.method import DenseMethod, get_path, low_rank, register
from jaxpeft.adapters.svd import orthogonality_gap

SCALE_EPS = 1e-5


@dataclass(frozen=True)
class AdaloraConfig(AdapterConfig):
    """PEFT's AdaLoraConfig fields.

    init_r / target_r: rank per module at the start / average rank per module at the end. tinit: steps before
    pruning starts; tfinal: steps at the end with the final pattern fixed; deltaT: steps between re-allocations
    in between. beta1 / beta2: EMA factors of sensitivity and uncertainty. orth_reg_weight: weight of the
    orthogonality regulariser (mean over all A and B of ||A^T A - I||_F / ||B B^T - I||_F). total_step: the
    schedule's length (None: the run's train.steps).
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "adalora")
        if not 1 <= self.target_r <= self.init_r:
            raise AdapterError(f"target_r={self.target_r}, init_r={self.init_r}: need 1 <= target_r <= init_r")
        if self.rank_pattern or self.alpha_pattern:
            raise AdapterError("rank_pattern / alpha_pattern: AdaLoRA allocates each module's rank itself (init_r at "
                               "the start, target_r on average at the end); drop them, or use LoRA with rank_pattern")
        for key in ("beta1", "beta2"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise AdapterError(f"{key}={getattr(self, key)}: must be in (0, 1)")
        if self.orth_reg_weight < 0:
            raise AdapterError(f"orth_reg_weight={self.orth_reg_weight}: must be >= 0")
        if self.deltaT < 1 or self.tinit < 0 or self.tfinal < 0:
            raise AdapterError(f"deltaT={self.deltaT}, tinit={self.tinit}, tfinal={self.tfinal}: deltaT >= 1, "
                             "tinit and tfinal >= 0")
        if self.total_step is not None:
            check_schedule(self, self.total_step)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")


def check_schedule(cfg: AdaloraConfig, total: int) -> None:
    """ValueError unless the schedule of `total` steps has a budgeting phase: total > 0 and tinit < total - tfinal."""
    if total <= 0 or cfg.tinit >= total - cfg.tfinal:
        raise AdapterError(f"AdaLoRA schedule: tinit={cfg.tinit} must be < total_step - tfinal = {total} - "
                         f"{cfg.tfinal} (no budgeting phase otherwise): lower tinit/tfinal or train longer")


def budget_schedule(cfg: AdaloraConfig, step: jax.Array, total: int, init_bgt: int, target_bgt: int
                    ) -> tuple[jax.Array, jax.Array]:
    """(budget, mask now?) at `step`, as PEFT's RankAllocator.budget_schedule (cubic decrease)."""
    span = max(total - cfg.tfinal - cfg.tinit, 1)
    mul = 1.0 - (step - cfg.tinit) / span
    cubic = jnp.floor((init_bgt - target_bgt) * mul ** 3 + target_bgt).astype(jnp.int32)
    budget = jnp.where(step <= cfg.tinit, init_bgt, jnp.where(step > total - cfg.tfinal, target_bgt, cubic))
    mask_now = jnp.where(step <= cfg.tinit, False, jnp.where(step > total - cfg.tfinal, True,
                                                             step % cfg.deltaT == 0))
    return budget, mask_now


class Adalora(DenseMethod):
    """AdaLoRA: trainable lora_A (n_in, r_init), lora_E (r_init,), lora_B (r_init, n_out); the output changes by
    s ((drop(x) A) * E) B. The rank allocator (a training hook) zeroes pruned triplets' E after optimizer steps."""

    name = "adalora"
    config_cls = AdaloraConfig

    def default_targets(self, arch):
        return DEFAULT_TARGETS[arch]

    def scale(self, cfg, options):
        alpha = options.get("alpha", cfg.lora_alpha)
        r = cfg.init_r
        return (alpha if alpha > 0 else float(r)) / (r + SCALE_EPS)

    def init(self, cfg, options, kernel, bias, rng):
        n_in, n_out = kernel.shape
        ka, kb = jax.random.split(rng)
        return {"lora_A": 0.02 * jax.random.normal(ka, (n_in, cfg.init_r), jnp.float32),
                "lora_E": jnp.zeros((cfg.init_r,), jnp.float32),
                "lora_B": 0.02 * jax.random.normal(kb, (cfg.init_r, n_out), jnp.float32)}, {}

    def forward(self, cfg, options, x, base_out, base_fn, kernel, bias, trainable, extras, scale, dropout):
        return scale * low_rank(dropout(x), trainable["lora_A"], trainable["lora_B"], trainable["lora_E"])

    def merge(self, cfg, options, kernel, bias, trainable, extras, scale):
        delta = scale * ((trainable["lora_A"] * trainable["lora_E"]) @ trainable["lora_B"])
        return kernel.astype(jnp.float32) + delta, None if bias is None else bias.astype(jnp.float32)

    # ---- orthogonality regulariser ---------------------------------------------------------------------
    def has_regularizer(self, cfg):
        return cfg.orth_reg_weight > 0

    def regularizer_term(self, cfg, options, trainable, extras):
        gaps = orthogonality_gap(trainable["lora_A"], rows=False) + orthogonality_gap(trainable["lora_B"], rows=True)
        return cfg.orth_reg_weight * gaps, 2.0

    def regularizer_reduction(self, cfg):
        return "mean"

    # ---- the rank allocator (a training hook) --------------------------------------------------------------
    def has_train_hook(self, cfg):
        return True

    def init_hook_state(self, cfg, sites, trainable, extras):
        zeros = jax.tree.map(jnp.zeros_like, trainable["modules"])
        masks = {t.flax_module: jnp.ones(((t.num_layers,) if t.layered else ()) + (cfg.init_r,), jnp.bool_)
                 for t in sites}
        return {"avg_ipt": zeros, "avg_unc": jax.tree.map(jnp.zeros_like, zeros), "rank_mask": masks}

    def after_step(self, cfg, sites, step, total_steps, trainable, grads, extras, hook):
        total = cfg.total_step or total_steps
        check_schedule(cfg, total)
        selected = {t.flax_module: _selected(t, extras) for t in sites}
        n_modules = sum(len(t.layers) if t.layered else 1 for t in sites)  # module-layers, as PEFT counts them
        init_bgt, target_bgt = cfg.init_r * n_modules, cfg.target_r * n_modules
        end = total - cfg.tfinal
        modules = trainable["modules"]

        # sensitivity |w * g| and its two EMAs, while step < T - tfinal
        def ema(avg, unc, w, g):
            ipt = jnp.abs(w * g)
            new_avg = cfg.beta1 * avg + (1 - cfg.beta1) * ipt
            return new_avg, cfg.beta2 * unc + (1 - cfg.beta2) * jnp.abs(ipt - new_avg)

        pairs = jax.tree.map(ema, hook["avg_ipt"], hook["avg_unc"], modules, grads["modules"])
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        upd_avg = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
        upd_unc = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
        learning = step < end
        avg = jax.tree.map(lambda n, o: jnp.where(learning, n, o), upd_avg, hook["avg_ipt"])
        unc = jax.tree.map(lambda n, o: jnp.where(learning, n, o), upd_unc, hook["avg_unc"])

        # triplet scores (per site: (L, r)) = score(E) + mean score over A's column + over B's row
        scores = {}
        for t in sites:
            a_s = get_path(avg, t.flax_module)
            u_s = get_path(unc, t.flax_module)
            s = {k: a_s[k] * u_s[k] for k in ("lora_A", "lora_E", "lora_B")}
            scores[t.flax_module] = s["lora_E"] + jnp.mean(s["lora_A"], axis=-2) + jnp.mean(s["lora_B"], axis=-1)
        flat = jnp.concatenate([jnp.where(selected[p][..., None], sc, jnp.inf).reshape(-1)
                                for p, sc in scores.items()])
        budget, mask_now = budget_schedule(cfg, step, total, init_bgt, target_bgt)
        budget = jnp.where(step == end, target_bgt, budget)  # PEFT's forced final allocation
        k = init_bgt - budget
        threshold = jnp.where(k > 0, jnp.sort(flat)[jnp.maximum(k - 1, 0)], -jnp.inf)
        allocate = (mask_now & learning) | (step == end)
        new_masks = {p: jnp.where(allocate, sc > threshold, hook["rank_mask"][p]) for p, sc in scores.items()}
        apply_mask = allocate | (step > end)  # after T - tfinal the stored pattern is re-applied every step
        new_modules = jax.tree.map(lambda x: x, modules)
        for t in sites:
            node = get_path(new_modules, t.flax_module)
            node["lora_E"] = jnp.where(apply_mask & ~new_masks[t.flax_module], 0.0, node["lora_E"])
        reset = step == end  # PEFT resets the importance EMAs after the final allocation
        avg = jax.tree.map(lambda x: jnp.where(reset, 0.0, x), avg)
        unc = jax.tree.map(lambda x: jnp.where(reset, 0.0, x), unc)
        return dict(trainable, modules=new_modules), {"avg_ipt": avg, "avg_unc": unc, "rank_mask": new_masks}

    def hook_extras(self, cfg, sites, hook):
        """The rank mask per site, written beside the adapter's extras for export (PEFT's rank_pattern)."""
        return {p: {"rank_mask": m} for p, m in hook["rank_mask"].items()}


def _selected(site: Any, extras: dict[str, Any]) -> jax.Array:
    """(L,) bool: the layers this site adapts (layers_to_transform), () for a site without a layer axis."""
    return get_path(extras["modules"], site.flax_module)["layer_mask"] > 0


register(Adalora())
