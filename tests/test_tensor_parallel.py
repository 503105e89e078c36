"""Each tensor-parallel layer, split over TP = 4 and TP = 2 ranks, equals the
plain single-rank computation with the full weight (forward and backward);
and the TP RNG stream differs across TP ranks while the default one agrees."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from multiprocess import run_ranks

from megatron_sr import parallel_state
from megatron_sr.random import get_rng_tracker, init_key, model_parallel_seed
from megatron_sr.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_shape,
    normal_init,
    shard_full_tensor,
    vocab_parallel_cross_entropy,
)

S, B, H, OUT, VOCAB = 8, 2, 16, 24, 32
TOL = 1e-5  # fp32, values O(1): only the summation order differs


def _init_full(layer, prefix):
    """Initializes `layer` like the model builder; returns {name: full tensor}."""
    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    full = {}
    with torch.no_grad():
        for name, param in layer.named_parameters():
            shape = full_shape(param, tp)
            tensor = torch.empty(shape)
            index = torch.arange(tensor.numel()).view(shape)
            param.init_method(tensor, index, init_key(0, f"{prefix}.{name}"))
            if name == "bias":  # zero-initialized in models; random here to test it
                normal_init(1.0)(tensor, index, init_key(1, f"{prefix}.{name}"))
            param.copy_(shard_full_tensor(tensor, param, rank, tp))
            full[name] = tensor
    return full


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _last_dim_shard(t, tp, rank, stride):
    """What a column-parallel rank outputs: its slice of each of `stride` blocks."""
    return torch.cat([block.chunk(tp, -1)[rank] for block in t.chunk(stride, -1)], -1)


def _err(a, b, tol=None):
    """(max abs difference, its tolerance)."""
    return (a.detach().float() - b.detach().float()).abs().max().item(), TOL if tol is None else tol


def _reference_linear(weight, bias, x, dy):
    """Single-rank y = x W^T + b and the gradients of sum(y * dy): (y, dx, dW, db)."""
    x, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = F.linear(x, w, b)
    (y * dy).sum().backward()
    return y.detach(), x.grad, w.grad, b.grad


def _check_linears(errors, tp, rank):
    x_full, dy_full = _randn(S, B, H, seed=1), _randn(S, B, OUT, seed=2)
    seq = slice(rank * S // tp, (rank + 1) * S // tp)

    for mode in ("column", "column_gather", "column_sp", "column_swiglu"):
        stride = 2 if mode == "column_swiglu" else 1
        layer = ColumnParallelLinear(H, OUT, bias=True, init_method=normal_init(0.5),
                                     params_dtype=torch.float32, gather_output=mode == "column_gather",
                                     sequence_parallel=mode == "column_sp", partition_stride=stride)
        full = _init_full(layer, mode)
        y_ref, dx_ref, dw_ref, db_ref = _reference_linear(full["weight"], full["bias"], x_full, dy_full)
        x = (x_full[seq] if mode == "column_sp" else x_full).clone().requires_grad_()
        y = layer(x)
        if mode == "column_gather":
            expected_y, dy = y_ref, dy_full
        else:
            expected_y, dy = (_last_dim_shard(t, tp, rank, stride) for t in (y_ref, dy_full))
        (y * dy).sum().backward()
        errors[f"tp{tp}/{mode}/y"] = _err(y, expected_y)
        errors[f"tp{tp}/{mode}/dx"] = _err(x.grad, dx_ref[seq] if mode == "column_sp" else dx_ref)
        errors[f"tp{tp}/{mode}/dw"] = _err(layer.weight.grad,
                                           shard_full_tensor(dw_ref, layer.weight, rank, tp))
        errors[f"tp{tp}/{mode}/db"] = _err(layer.bias.grad,
                                           shard_full_tensor(db_ref, layer.bias, rank, tp))

    x_full, dy_full = _randn(S, B, OUT, seed=3), _randn(S, B, H, seed=4)
    in_feat = slice(rank * OUT // tp, (rank + 1) * OUT // tp)
    for mode in ("row", "row_scatter_input", "row_sp"):
        layer = RowParallelLinear(OUT, H, bias=True, init_method=normal_init(0.5),
                                  params_dtype=torch.float32,
                                  input_is_parallel=mode != "row_scatter_input",
                                  sequence_parallel=mode == "row_sp")
        full = _init_full(layer, mode)
        y_ref, dx_ref, dw_ref, db_ref = _reference_linear(full["weight"], full["bias"], x_full, dy_full)
        x = (x_full if mode == "row_scatter_input" else x_full[..., in_feat]).clone().requires_grad_()
        y = layer(x)
        expected_y, dy = (y_ref[seq], dy_full[seq]) if mode == "row_sp" else (y_ref, dy_full)
        (y * dy).sum().backward()
        bias_grad = layer.bias.grad.clone()
        if mode == "row_sp":  # partial over the sequence shards: finalize_model_grads sums it
            dist.all_reduce(bias_grad, group=parallel_state.get_tensor_model_parallel_group())
        errors[f"tp{tp}/{mode}/y"] = _err(y, expected_y)
        errors[f"tp{tp}/{mode}/dx"] = _err(
            x.grad, dx_ref if mode == "row_scatter_input" else dx_ref[..., in_feat])
        errors[f"tp{tp}/{mode}/dw"] = _err(layer.weight.grad, dw_ref[:, in_feat])
        errors[f"tp{tp}/{mode}/db"] = _err(bias_grad, db_ref)


def _check_embedding_and_loss(errors, tp, rank):
    tokens = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(5))
    layer = VocabParallelEmbedding(VOCAB, H, init_method=normal_init(1.0), params_dtype=torch.float32)
    full = _init_full(layer, "embedding")
    w_ref = full["weight"].clone().requires_grad_()
    dy = _randn(B, S, H, seed=6)
    y_ref = F.embedding(tokens, w_ref)
    (y_ref * dy).sum().backward()
    y = layer(tokens)
    (y * dy).sum().backward()
    errors[f"tp{tp}/embedding/y"] = _err(y, y_ref)
    errors[f"tp{tp}/embedding/dw"] = _err(layer.weight.grad,
                                          shard_full_tensor(w_ref.grad, layer.weight, rank, tp))

    vocab = slice(rank * VOCAB // tp, (rank + 1) * VOCAB // tp)
    for dtype in (torch.float32, torch.bfloat16):
        logits_full = (3 * _randn(S, B, VOCAB, seed=7)).to(dtype)
        target = torch.randint(0, VOCAB, (S, B), generator=torch.Generator().manual_seed(8))
        dloss = _randn(S, B, seed=9)
        ref_logits = logits_full.float().clone().requires_grad_()
        loss_ref = F.cross_entropy(ref_logits.reshape(-1, VOCAB), target.reshape(-1),
                                   reduction="none").reshape(S, B)
        (loss_ref * dloss).sum().backward()
        logits = logits_full[..., vocab].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(logits, target)
        (loss * dloss).sum().backward()
        name = f"tp{tp}/cross_entropy_{str(dtype)[6:]}"
        errors[f"{name}/loss"] = _err(loss, loss_ref)  # fp32 math even for bf16 logits
        errors[f"{name}/loss_dtype_is_fp32"] = (float(loss.dtype != torch.float32), 0.0)
        expected = ref_logits.grad[..., vocab]
        # the gradient comes back in the logits' dtype: bf16 keeps 8 significant bits
        tol = TOL if dtype == torch.float32 else 2.0 ** -8 * expected.abs().max().item()
        errors[f"{name}/dlogits"] = _err(logits.grad, expected, tol)


def _tensor_parallel_checks(rank, world_size):
    errors, rng = {}, {}
    for tp in (4, 2):
        parallel_state.initialize_model_parallel(tp, 1)
        try:
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            _check_linears(errors, tp, tp_rank)
            _check_embedding_and_loss(errors, tp, tp_rank)
            model_parallel_seed(7)
            with get_rng_tracker().fork():
                forked = torch.rand(4).tolist()
            rng[tp] = {"tp_rank": tp_rank, "forked": forked, "default": torch.rand(4).tolist()}
        finally:
            parallel_state.destroy_model_parallel()
    return errors, rng


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(_tensor_parallel_checks, 4)


def test_layers_and_cross_entropy_match_single_rank(tp_results):
    worst = {}
    for errors, _ in tp_results:
        for name, (err, tol) in errors.items():
            worst[name] = max(worst.get(name, (0.0, tol)), (err, tol))
    failing = {name: err_tol for name, err_tol in worst.items() if err_tol[0] > err_tol[1]}
    assert not failing, failing
    assert {name.split("/")[0] for name in worst} == {"tp4", "tp2"}


def test_tp_rng_stream_differs_across_tp_ranks_default_stream_agrees(tp_results):
    for tp in (4, 2):
        by_rank = [rng[tp] for _, rng in tp_results]
        defaults = {tuple(r["default"]) for r in by_rank}
        assert len(defaults) == 1  # one stage: the same default stream everywhere
        forked = {r["tp_rank"]: tuple(r["forked"]) for r in by_rank}
        assert len(set(forked.values())) == tp
        # ranks with the same TP rank (different DP ranks) draw the same TP stream
        for r in by_rank:
            assert tuple(r["forked"]) == forked[r["tp_rank"]]
