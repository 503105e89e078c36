"""A standalone AdamW for any PyTorch training loop, in every precision strategy.

`AdamW(params, lr, betas, eps, weight_decay, strategy="bf16-sr", seed=0)` is a
`torch.optim.Optimizer` that runs `megatron_sr.precision.adamw.adamw_shard_step`
on each parameter (one segment: the whole tensor; its table is built once and
its device copy uploaded at the first step only), so a plain PyTorch user gets bf16 weights updated with
stochastic rounding without the rest of megatron_sr:

    model = model.to(torch.bfloat16)
    optimizer = AdamW(model.parameters(), lr=1e-3, strategy="bf16-sr")

Parameters must have the strategy's param dtype (bf16 for the bf16-*
strategies, fp32 for fp32/amp). Gradients are converted to the strategy's
grad dtype if needed (e.g. bf16 autograd grads for bf16-mixed's fp32 grad).
State per parameter: `step`, `exp_avg`, `exp_avg_sq` and, as the strategy
says, an fp32 `master` copy or a bf16 `kahan` compensation buffer.

Random bits: the parameter at position `index` of the optimizer's parameter
list draws with key `sr_key(seed, step, f"param{index}")`. `seed` lives in
each param group and `step` in each parameter's state, so both travel in
`state_dict()` and a resumed run draws exactly the bits an uninterrupted
run would have drawn.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_sr.precision.adamw import SegmentTable, adamw_shard_step
from megatron_sr.precision.strategies import PrecisionStrategy, get_strategy
from megatron_sr.random import sr_key

_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "master", "kahan")


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with the storage and
    rounding of precision strategy `strategy` (a `--precision` name).
    `optimizer_state_dtype` ("bf16"/"fp32") is `--optimizer-state-dtype`;
    `backend` is passed to `adamw_step` (None: Triton on CUDA, the torch
    path otherwise)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, strategy: str = "bf16-sr", seed: int = 0,
                 optimizer_state_dtype: Optional[str] = None, backend: Optional[str] = None):
        if lr < 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if eps <= 0.0:
            raise ValueError(f"AdamW: eps must be > 0, got {eps}")
        if seed < 0:
            raise ValueError(f"AdamW: seed must be >= 0, got {seed}")
        self.strategy: PrecisionStrategy = get_strategy(strategy, optimizer_state_dtype)
        self.backend = backend
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, seed=seed)
        super().__init__(params, defaults)
        # Per parameter, its one-segment table: built once, so that its device form
        # (`SegmentTable.device_table`) is uploaded at the first step only.
        self._segment_tables: dict[torch.Tensor, SegmentTable] = {}
        for index, param in enumerate(self._all_params()):
            if param.dtype != self.strategy.param_dtype:
                raise TypeError(f"AdamW: parameter {index} has dtype {param.dtype}, strategy "
                                f"{self.strategy.name!r} needs {self.strategy.param_dtype}")

    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _init_state(self, param: torch.Tensor) -> dict:
        strategy = self.strategy
        state = self.state[param]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, dtype=strategy.exp_avg_dtype,
                                            memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=strategy.exp_avg_sq_dtype,
                                               memory_format=torch.contiguous_format)
        if strategy.master_dtype is not None:
            state["master"] = param.detach().to(strategy.master_dtype, memory_format=torch.contiguous_format)
        if strategy.kahan_dtype is not None:
            state["kahan"] = torch.zeros_like(param, dtype=strategy.kahan_dtype,
                                              memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                param_index, index = index, index + 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TypeError(f"AdamW: parameter {param_index} has a sparse gradient")
                state = self.state[param] if self.state[param] else self._init_state(param)
                state["step"] += 1
                if not param.is_contiguous():
                    raise ValueError(f"AdamW: parameter {param_index} must be contiguous")
                grad = param.grad.to(self.strategy.grad_dtype).contiguous()
                table = self._segment_tables.get(param)
                if table is None:
                    table = self._segment_tables[param] = SegmentTable([0], [param.numel()], [0], [True])
                master, kahan = state.get("master"), state.get("kahan")
                adamw_shard_step(self.strategy, param.data.view(-1), grad.view(-1), state["exp_avg"].view(-1),
                                 state["exp_avg_sq"].view(-1),
                                 master=master.view(-1) if master is not None else None,
                                 kahan=kahan.view(-1) if kahan is not None else None,
                                 segments=table, lr=group["lr"],
                                 sr_keys=[sr_key(group["seed"], state["step"], f"param{param_index}")],
                                 beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                 step=state["step"], backend=self.backend)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load like torch.optim.Optimizer, then restore each state tensor in
        the strategy's dtype (torch's loader casts them to the param dtype,
        which would truncate an fp32 master copy of a bf16 parameter)."""
        super().load_state_dict(state_dict)
        expected = dict(exp_avg=self.strategy.exp_avg_dtype, exp_avg_sq=self.strategy.exp_avg_sq_dtype,
                        master=self.strategy.master_dtype, kahan=self.strategy.kahan_dtype)
        for index, param in enumerate(self._all_params()):
            saved = state_dict["state"].get(index)
            if not saved:
                continue
            for name in _STATE_TENSORS:
                if expected[name] is None:
                    if name in saved:
                        raise ValueError(f"AdamW.load_state_dict: parameter {index} has a {name!r} tensor, "
                                         f"which strategy {self.strategy.name!r} does not keep")
                    continue
                if name not in saved:
                    raise ValueError(f"AdamW.load_state_dict: parameter {index} lacks {name!r}, which "
                                     f"strategy {self.strategy.name!r} needs")
                self.state[param][name] = saved[name].to(device=param.device, dtype=expected[name],
                                                         copy=True).contiguous()
            self.state[param]["step"] = int(saved["step"])
