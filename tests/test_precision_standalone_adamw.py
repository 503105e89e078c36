"""`megatron_sr.optimizer.AdamW`, the drop-in torch.optim optimizer: training
quality per strategy, resumable random stream, input checks."""
import copy

import pytest
import torch

from megatron_sr.optimizer import AdamW
from precision_helpers import same_bits

IN_FEATURES, OUT_FEATURES, SAMPLES = 64, 4, 512
NOISE = 1.0


def regression_problem():
    """Noisy linear regression whose start and optimum weights are O(1), so an
    Adam step of lr=3e-3 is below half a bf16 ulp of most weights."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SAMPLES, IN_FEATURES, generator=generator)
    start = 1 + torch.rand(OUT_FEATURES, IN_FEATURES, generator=generator)
    optimum = start + 0.3 * torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator)
    targets = inputs @ optimum.T + NOISE * torch.randn(SAMPLES, OUT_FEATURES, generator=generator)
    return inputs, targets, start


def make_model(start, dtype):
    model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    with torch.no_grad():
        model.weight.copy_(start)
    return model.to(dtype)


def train(strategy, steps=300, lr=3e-3):
    inputs, targets, start = regression_problem()
    dtype = torch.float32 if strategy == "fp32" else torch.bfloat16
    model = make_model(start, dtype)
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.0, strategy=strategy, seed=1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(inputs.to(dtype)).float() - targets).square().mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (inputs @ model.weight.float().T - targets).square().mean().item()


def test_bf16_sr_trains_like_fp32_where_bf16_rtn_stalls():
    losses = {strategy: train(strategy) for strategy in ("fp32", "bf16-sr", "bf16")}
    initial = train("fp32", steps=0)
    assert losses["fp32"] < 0.2 * initial
    assert abs(losses["bf16-sr"] - losses["fp32"]) < 0.05 * losses["fp32"]
    assert losses["bf16"] > 3 * losses["fp32"]


@pytest.mark.parametrize("strategy", ["bf16-sr", "bf16-mixed", "bf16-kahan"])
def test_resumed_run_draws_the_same_bits(strategy):
    inputs, targets, start = regression_problem()

    def run(model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            (model(inputs.bfloat16()).float() - targets).square().mean().backward()
            optimizer.step()

    model = make_model(start, torch.bfloat16)
    optimizer = AdamW(model.parameters(), lr=1e-2, strategy=strategy, seed=7)
    run(model, optimizer, 3)
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                  "optimizer": copy.deepcopy(optimizer.state_dict())}
    run(model, optimizer, 3)

    resumed = make_model(start, torch.bfloat16)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = AdamW(resumed.parameters(), lr=1e-2, strategy=strategy, seed=12345)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed_optimizer.param_groups[0]["seed"] == 7
    for name, tensor in optimizer.state[model.weight].items():
        if isinstance(tensor, torch.Tensor):
            assert resumed_optimizer.state[resumed.weight][name].dtype == tensor.dtype, name
    run(resumed, resumed_optimizer, 3)
    assert same_bits(resumed.weight.detach(), model.weight.detach())


def test_bad_parameters_are_named():
    with pytest.raises(TypeError, match="parameter 1 has dtype torch.float32"):
        AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="--precision"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], strategy="fp16")
    with pytest.raises(ValueError, match="lr"):
        AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], lr=-1.0)


def test_segment_tables_are_built_and_uploaded_at_the_first_step_only(monkeypatch):
    """One table per parameter, made at its first step; later steps build and
    upload none (a table's device form is a host-to-device copy)."""
    from megatron_sr.precision import adamw as precision_adamw

    built = []
    table_class = precision_adamw.SegmentTable
    init, device_table, native_table = (table_class.__init__, table_class.device_table,
                                        table_class.native_table)

    def counting_init(self, *args, **kwargs):
        built.append("table")
        init(self, *args, **kwargs)

    def counting_device_table(self, device):
        if torch.device(device) not in self._device_tables:
            built.append("device upload")
        return device_table(self, device)

    def counting_native_table(self):
        if self._native_table is None:
            built.append("native table")
        return native_table(self)

    monkeypatch.setattr(table_class, "__init__", counting_init)
    monkeypatch.setattr(table_class, "device_table", counting_device_table)
    monkeypatch.setattr(table_class, "native_table", counting_native_table)
    inputs, targets, start = regression_problem()
    model = torch.nn.Sequential(torch.nn.Linear(start.shape[1], start.shape[0]),
                                torch.nn.Linear(start.shape[0], 3)).to(torch.bfloat16)
    optimizer = AdamW(model.parameters(), lr=1e-2, strategy="bf16-sr")
    per_step = []
    for _ in range(4):
        built.clear()
        optimizer.zero_grad()
        model(inputs.bfloat16()).float().square().mean().backward()
        optimizer.step()
        per_step.append(len([b for b in built if b == "table"]))
        later = list(built)
    assert per_step == [4, 0, 0, 0]  # 2 weights and 2 biases
    assert later == []
