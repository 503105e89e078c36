"""--eod-mask-loss, --reset-position-ids, --reset-attention-mask: the inputs
Megatron's get_ltor_masks_and_position_ids builds, and a packed sample with
document masks computes what its documents compute one by one.

The attention mask is held as document ids (`DocumentMask`) and attention runs
document by document: the same outputs and gradients as SDPA with Megatron's
dense [b, 1, s, s] mask (fp32, GQA), and no s x s tensor is built in a
training step (issue 27)."""
import numpy as np
import torch

from gpt_harness import SEED, tiny_config
from multiprocess import run_ranks

from megatron_sr import parallel_state
from megatron_sr.config import ParallelConfig
from megatron_sr.data.document_masks import document_inputs, masked_mean
from megatron_sr.model import build_model

EOD = 0


def _megatron_reference(tokens):
    """Megatron's loop: after each eod at i, later positions restart and
    cannot see [0, i]."""
    b, s = tokens.shape
    mask = torch.ones(s, s).tril().repeat(b, 1, 1)
    positions = torch.arange(s).repeat(b, 1)
    for row in range(b):
        previous = 0
        for i in (tokens[row] == EOD).nonzero().flatten().tolist():
            mask[row, i + 1:, :i + 1] = 0
            positions[row, i + 1:] -= i + 1 - previous
            previous = i + 1
    return mask[:, None].bool(), positions


def test_document_inputs_match_megatrons_loop():
    tokens = torch.tensor([[5, 6, EOD, 7, 8, EOD, EOD, 9], [EOD, 1, 2, 3, 4, 5, 6, 7]])
    inputs = document_inputs(tokens, EOD, eod_mask_loss=True, reset_position_ids=True,
                             reset_attention_mask=True)
    mask, positions = _megatron_reference(tokens)
    assert torch.equal(inputs.attention_mask.dense(), mask)
    assert inputs.attention_mask.segments() == [[(0, 3), (3, 6), (6, 7), (7, 8)], [(0, 1), (1, 8)]]
    assert torch.equal(inputs.position_ids, positions)
    assert torch.equal(inputs.loss_mask, (tokens != EOD).float())
    off = document_inputs(tokens, EOD, eod_mask_loss=False, reset_position_ids=False,
                          reset_attention_mask=False)
    assert off == (None, None, None)


def test_masked_mean_averages_kept_tokens():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert masked_mean(losses, None) == 2.5
    assert masked_mean(losses, torch.tensor([[1.0, 0.0, 1.0, 0.0]])) == 2.0


def _packed_and_alone(rank, world_size):
    config = tiny_config(position_embedding_type="rope", normalization="RMSNorm",
                         activation="swiglu", ffn_hidden_size=48, num_query_groups=2)
    parallel_state.initialize_model_parallel(1)
    try:
        (model,) = build_model(config, ParallelConfig(), seed=SEED)
        model.eval()
        first, second = torch.tensor([[5, 6, 7, EOD]]), torch.tensor([[9, 10, 11, 12]])
        packed = torch.cat([first, second], dim=1)
        inputs = document_inputs(packed, EOD, eod_mask_loss=False, reset_position_ids=True,
                                 reset_attention_mask=True)
        with torch.no_grad():
            together = model(packed, position_ids=inputs.position_ids,
                             attention_mask=inputs.attention_mask)
            alone = torch.cat([model(first), model(second)], dim=1)
            causal_only = model(packed)
        return together.numpy(), alone.numpy(), causal_only.numpy()
    finally:
        parallel_state.destroy_model_parallel()


def test_packed_documents_compute_what_each_document_computes():
    together, alone, causal_only = run_ranks(_packed_and_alone, 1)[0]
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert not np.allclose(causal_only[:, 4:], alone[:, 4:], atol=1e-3)


class _Chunk:
    def __init__(self, pre_process, post_process):
        self.pre_process, self.post_process = pre_process, post_process


def test_get_batch_gives_megatrons_five_values_from_a_document_stream():
    from megatron_sr.training import DocumentSettings, MicroBatchStream, get_batch

    rows = torch.tensor([[5, 6, EOD, 7, 8, EOD, 9, 4, 3], [EOD, 1, 2, 3, 4, 5, 6, 7, 8]])
    settings = DocumentSettings(eod=EOD, eod_mask_loss=True, reset_position_ids=True,
                                reset_attention_mask=True)
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(
        MicroBatchStream(iter([rows]), settings), _Chunk(True, False))
    expected = document_inputs(rows[:, :-1], EOD, eod_mask_loss=True, reset_position_ids=True,
                               reset_attention_mask=True)
    assert torch.equal(tokens, rows[:, :-1]) and torch.equal(labels, rows[:, 1:])
    assert torch.equal(loss_mask, expected.loss_mask)
    assert torch.equal(attention_mask.document_ids, expected.attention_mask.document_ids)
    assert torch.equal(position_ids, expected.position_ids)
    # A middle pipeline chunk draws its micro-batch too: it needs positions and masks.
    middle = get_batch(MicroBatchStream(iter([rows]), settings), _Chunk(False, False))
    assert torch.equal(middle[3].document_ids, expected.attention_mask.document_ids)
    # Without document flags (or a plain iterator): Megatron's defaults, nothing drawn mid-pipe.
    plain = get_batch(iter([rows]), _Chunk(True, True))
    assert plain[2:] == (None, None, None)
    assert get_batch(None, _Chunk(False, False)) == (None,) * 5


# ----- document attention without an s x s mask ---------------------------------------------

def _packed_tokens(b: int, s: int, seed: int) -> torch.Tensor:
    """[b, s] tokens of packed documents of 1 to 12 tokens (eod-ended), one row
    starting with an eod."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 60, (b, s), generator=gen)
    for row in range(b):
        position = 0 if row == 0 else int(torch.randint(0, 12, (), generator=gen))
        while position < s:
            tokens[row, position] = EOD
            position += int(torch.randint(1, 13, (), generator=gen))
    return tokens


def test_attention_per_document_equals_sdpa_with_the_dense_mask():
    """fp32, GQA (4 query heads over 2 key/value groups): outputs and input
    gradients of the per-document path match masked SDPA, today's path."""
    import torch.nn.functional as F

    from megatron_sr.model.transformer import _attention_per_document

    b, s, d = 3, 40, 8
    mask = document_inputs(_packed_tokens(b, s, seed=3), EOD, eod_mask_loss=False,
                           reset_position_ids=False, reset_attention_mask=True).attention_mask
    assert max(len(documents) for documents in mask.segments()) > 3
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, heads, s, d, generator=gen, requires_grad=True)
               for heads in (4, 2, 2))
    grad = torch.randn(b, 4, s, d, generator=gen)
    per_document = _attention_per_document(q, k, v, mask, 0.0, dict(enable_gqa=True))
    per_document_grads = torch.autograd.grad(per_document, (q, k, v), grad)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True)
    dense_grads = torch.autograd.grad(dense, (q, k, v), grad)
    torch.testing.assert_close(per_document, dense, rtol=1e-5, atol=1e-6)
    for mine, reference in zip(per_document_grads, dense_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


def _largest_square_in_a_training_step(rank, world_size):
    """document_inputs, then forward and backward of a GQA model on packed
    documents (s = 40), recording every tensor any operation produces; returns
    the shapes whose last two dimensions are s x s."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    s = 40
    config = tiny_config(position_embedding_type="rope", seq_length=s, num_query_groups=2)
    squares = []

    class RecordSquares(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (s, s):
                    squares.append((str(func), tuple(t.shape)))
            return out

    parallel_state.initialize_model_parallel(1)
    try:
        (model,) = build_model(config, ParallelConfig(), seed=SEED)
        tokens = _packed_tokens(2, s, seed=5)
        with RecordSquares():
            inputs = document_inputs(tokens, EOD, eod_mask_loss=False, reset_position_ids=True,
                                     reset_attention_mask=True)
            loss = model(tokens, position_ids=inputs.position_ids, labels=tokens,
                         attention_mask=inputs.attention_mask).mean()
            loss.backward()
        return squares
    finally:
        parallel_state.destroy_model_parallel()


def test_document_masks_never_build_an_s_by_s_tensor():
    assert run_ranks(_largest_square_in_a_training_step, 1)[0] == []
