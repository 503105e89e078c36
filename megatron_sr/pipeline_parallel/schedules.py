"""Forward-backward schedules over micro-batches: no pipelining, 1F1B, interleaved 1F1B.

All three share one signature (`get_forward_backward_func` picks one):

    losses = forward_backward(forward_step_func=..., data_iterator=..., model=chunks,
                              num_microbatches=M, seq_length=s, micro_batch_size=b,
                              forward_only=False)

- `model`: this rank's chunks from `build_model` (a list; one chunk unless interleaved).
- `data_iterator`: one iterator, or a list with one per chunk. Only chunks
  with `pre_process` (tokens) or `post_process` (labels) need data;
  `forward_step_func` should not draw from it for other chunks.
- `forward_step_func(data_iterator, model_chunk) -> (output, loss_func)`:
  runs `model_chunk(tokens, position_ids, labels)` on the next micro-batch.
  On the last stage `loss_func(output)` returns that micro-batch's mean loss
  (a scalar); the schedule backpropagates loss / M, so the accumulated
  gradients are those of the mean loss over all M micro-batches.
- Returns, on ranks holding the last stage, the M unscaled micro-batch losses
  (detached scalars, in micro-batch order); an empty list elsewhere.
- Gradients accumulate into `.grad` (or wherever the parameters' hooks put
  them); no gradient is synchronized here: the optimizer's buffer
  (`ParamAndGradBuffer.finish_grad_sync`), or `megatron_sr.model.finalize_model_grads`
  for plain `.grad`, does it afterwards. `forward_only` runs the forwards under no_grad.

Between stages travel [s (/ tp with sequence parallelism), b, h] tensors in
the params dtype (`p2p_communication`). Every rank of the PP group runs the
same schedule with the same M; the interleaved one needs M divisible by the
PP size. Once a stage has sent a micro-batch's output to the next stage, it
drops the output's values and keeps only its autograd graph
(`_release_sent_output`): the backward needs the graph and the gradient that
comes back, not the values, so a micro-batch awaiting its backward holds its
activations inside the chunk but not one more [s, b, h] output.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch

from megatron_sr import parallel_state
from megatron_sr.pipeline_parallel import p2p_communication as p2p


def get_forward_backward_func(pipeline_model_parallel_size: Optional[int] = None,
                              virtual_pipeline_model_parallel_size: Optional[int] = None
                              ) -> Callable[..., list]:
    """The schedule for a layout; sizes default to those of `parallel_state`."""
    if pipeline_model_parallel_size is None:
        pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
        virtual_pipeline_model_parallel_size = \
            parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if pipeline_model_parallel_size == 1:
        return forward_backward_no_pipelining
    if virtual_pipeline_model_parallel_size is None:
        return forward_backward_pipelining_without_interleaving
    return forward_backward_pipelining_with_interleaving


def _tensor_shape(chunk, seq_length: int, micro_batch_size: int):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    s = seq_length // tp if chunk.sequence_parallel else seq_length
    return (s, micro_batch_size, chunk.config.hidden_size), chunk.config.params_dtype


def _forward_step(forward_step_func, data_iterator, chunk, input_tensor, num_microbatches, losses):
    """Runs one micro-batch through `chunk`; on the last stage returns loss / M."""
    chunk.set_input_tensor(input_tensor)
    output, loss_func = forward_step_func(data_iterator, chunk)
    if chunk.post_process:
        loss = loss_func(output)
        losses.append(loss.detach())
        output = loss / num_microbatches
    return output


def _release_sent_output(output: Optional[torch.Tensor]) -> None:
    """Frees the storage of `output`, a chunk's output already sent to the next
    stage (its [s, b, h] values are on the wire and no longer needed here),
    keeping its shape, dtype and autograd graph for `_backward_step`: its data
    becomes one element broadcast to its shape. Kept as it is when it is a
    view of another tensor (freeing it would free nothing) or when the
    operation that produced it saved it for its own backward."""
    if output is None or output._base is not None or _saved_by_its_backward(output):
        return
    output.data = output.new_empty(1).expand(output.shape)


def _saved_by_its_backward(output: torch.Tensor) -> bool:
    """Whether the node that produced `output` keeps `output` itself for its
    backward (built-in results such as exp's, or a custom autograd Function's
    ctx.save_for_backward)."""
    node = output.grad_fn
    if node is None:
        return False
    if hasattr(node, "_saved_result"):
        return True
    saved = getattr(node, "saved_tensors", None) or ()
    return any(t.data_ptr() == output.data_ptr() for t in saved)


def _backward_step(input_tensor, output_tensor, output_grad):
    """Backpropagates one micro-batch; returns the gradient for the previous stage."""
    torch.autograd.backward(output_tensor, grad_tensors=output_grad)
    return None if input_tensor is None else input_tensor.grad


def _as_list(model, data_iterator):
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    iterators = (list(data_iterator) if isinstance(data_iterator, (list, tuple))
                 else [data_iterator] * len(chunks))
    if len(iterators) != len(chunks):
        raise ValueError(f"got {len(iterators)} data iterators for {len(chunks)} model chunks")
    return chunks, iterators


def forward_backward_no_pipelining(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                   seq_length: int, micro_batch_size: int,
                                   forward_only: bool = False) -> list:
    """Gradient accumulation over M micro-batches on a single stage."""
    chunks, iterators = _as_list(model, data_iterator)
    if len(chunks) != 1:
        raise ValueError("forward_backward_no_pipelining takes one model chunk")
    losses: list = []
    with torch.no_grad() if forward_only else nullcontext():
        for _ in range(num_microbatches):
            output = _forward_step(forward_step_func, iterators[0], chunks[0], None,
                                   num_microbatches, losses)
            if not forward_only:
                _backward_step(None, output, None)
    return losses


def forward_backward_pipelining_without_interleaving(
        *, forward_step_func, data_iterator, model, num_microbatches: int, seq_length: int,
        micro_batch_size: int, forward_only: bool = False) -> list:
    """1F1B: stage p runs PP - p - 1 warm-up forwards, then alternates one
    forward and one backward, then drains the remaining backwards. At most
    PP - p micro-batches' activations are alive on stage p."""
    chunks, iterators = _as_list(model, data_iterator)
    if len(chunks) != 1:
        raise ValueError("1F1B without interleaving takes one model chunk per rank")
    chunk, iterator = chunks[0], iterators[0]
    shape, dtype = _tensor_shape(chunk, seq_length, micro_batch_size)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    warmup = min(pp - parallel_state.get_pipeline_model_parallel_rank() - 1, num_microbatches)
    steady = num_microbatches - warmup
    losses: list = []
    in_flight: list = []  # (input, output) of micro-batches awaiting backward

    def forward(input_tensor):
        return _forward_step(forward_step_func, iterator, chunk, input_tensor, num_microbatches,
                             losses)

    with torch.no_grad() if forward_only else nullcontext():
        for _ in range(warmup):
            input_tensor = p2p.recv_forward(shape, dtype)
            output = forward(input_tensor)
            p2p.send_forward(output, shape, dtype)
            if not forward_only and not chunk.post_process:
                _release_sent_output(output)
            in_flight.append((input_tensor, output))

        input_tensor = p2p.recv_forward(shape, dtype) if steady > 0 else None
        for i in range(steady):
            last = i == steady - 1
            output = forward(input_tensor)
            if forward_only:
                p2p.send_forward(output, shape, dtype)
                input_tensor = None if last else p2p.recv_forward(shape, dtype)
                continue
            output_grad = p2p.send_forward_recv_backward(output, shape, dtype)
            if not chunk.post_process:
                _release_sent_output(output)
            in_flight.append((input_tensor, output))
            oldest_input, oldest_output = in_flight.pop(0)
            input_grad = _backward_step(oldest_input, oldest_output, output_grad)
            if last:
                input_tensor = None
                p2p.send_backward(input_grad, shape, dtype)
            else:
                input_tensor = p2p.send_backward_recv_forward(input_grad, shape, dtype)

        if not forward_only:
            for _ in range(warmup):
                oldest_input, oldest_output = in_flight.pop(0)
                output_grad = p2p.recv_backward(shape, dtype)
                input_grad = _backward_step(oldest_input, oldest_output, output_grad)
                p2p.send_backward(input_grad, shape, dtype)
    return losses


def forward_backward_pipelining_with_interleaving(
        *, forward_step_func, data_iterator, model, num_microbatches: int, seq_length: int,
        micro_batch_size: int, forward_only: bool = False) -> list:
    """Interleaved 1F1B over V chunks per rank (virtual stages).

    Micro-batches go through the chunks in groups of PP: forward step k runs
    chunk (k mod (PP * V)) // PP, backward step k the mirror chunk; the
    pipeline bubble shrinks by a factor V at the cost of V times more
    point-to-point traffic. After chunk v on the last rank, activations wrap
    around to chunk v + 1 on the first rank.
    """
    chunks, iterators = _as_list(model, data_iterator)
    num_chunks = len(chunks)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if num_microbatches % pp != 0:
        raise ValueError(
            f"interleaved pipelining needs the number of micro-batches per step ({num_microbatches} "
            f"= --global-batch-size / (--micro-batch-size x data-parallel size)) to be a multiple "
            f"of --pipeline-model-parallel-size ({pp})")
    shape, dtype = _tensor_shape(chunks[0], seq_length, micro_batch_size)
    total = num_microbatches * num_chunks
    all_warmup = forward_only or num_microbatches == pp
    warmup = total if all_warmup else min((pp - pp_rank - 1) * 2 + (num_chunks - 1) * pp, total)
    steady = total - warmup

    inputs = [[] for _ in chunks]
    outputs = [[] for _ in chunks]
    output_grads = [[] for _ in chunks]
    losses: list = []
    first_rank = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last_rank = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def chunk_of(step: int, forward: bool) -> int:
        c = (step % (pp * num_chunks)) // pp
        return c if forward else num_chunks - 1 - c

    def exchange(*, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        return p2p.communicate(send_next=send_next, send_prev=send_prev, recv_prev=recv_prev,
                               recv_next=recv_next, shape=shape, dtype=dtype)

    def run_forward(step: int):
        """Forward of step `step`; returns what to send on (None from the last stage)."""
        c = chunk_of(step, forward=True)
        parallel_state.set_virtual_pipeline_model_parallel_rank(c)
        if parallel_state.is_pipeline_first_stage() and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)
        output = _forward_step(forward_step_func, iterators[c], chunks[c], inputs[c][-1],
                               num_microbatches, losses)
        outputs[c].append(output)
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return None if parallel_state.is_pipeline_last_stage() else output

    def run_backward(step: int):
        """Backward of step `step`; returns what to send back (None from the first stage)."""
        c = chunk_of(step, forward=False)
        parallel_state.set_virtual_pipeline_model_parallel_rank(c)
        if parallel_state.is_pipeline_last_stage() and not output_grads[c]:
            output_grads[c].append(None)
        input_grad = _backward_step(inputs[c].pop(0), outputs[c].pop(0), output_grads[c].pop(0))
        return None if parallel_state.is_pipeline_first_stage() else input_grad

    with torch.no_grad() if forward_only else nullcontext():
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
        if not parallel_state.is_pipeline_first_stage():
            inputs[0].append(exchange(recv_prev=True)[0])

        for k in range(warmup):
            output = run_forward(k)
            next_chunk = chunk_of(k + 1, forward=True)
            recv_prev = not (first_rank and next_chunk == 0) and k != total - 1
            if k == warmup - 1 and not all_warmup:
                # Last warm-up step: also receive the first gradient for the backwards.
                from_prev, from_next = exchange(send_next=output, recv_prev=recv_prev,
                                                recv_next=not last_rank)
                if not last_rank:
                    output_grads[num_chunks - 1].append(from_next)
            else:
                from_prev, _ = exchange(send_next=output, recv_prev=recv_prev)
            if not forward_only:
                _release_sent_output(output)
            if recv_prev:
                inputs[next_chunk].append(from_prev)

        for i in range(steady):
            forward_step, backward_step = warmup + i, i
            output = run_forward(forward_step)
            input_grad = run_backward(backward_step)

            recv_prev = True
            if first_rank:
                # The first rank's next forward input is what the last rank
                # produced PP - 1 steps ago, for the following chunk.
                next_forward_chunk = chunk_of(forward_step - (pp - 1), forward=True)
                recv_prev = next_forward_chunk != num_chunks - 1
                next_forward_chunk += 1
            else:
                next_forward_chunk = chunk_of(forward_step + 1, forward=True)
            recv_next = True
            if last_rank:
                next_backward_chunk = chunk_of(backward_step - (pp - 1), forward=False)
                recv_next = next_backward_chunk != 0
                next_backward_chunk -= 1
            else:
                next_backward_chunk = chunk_of(backward_step + 1, forward=False)
            if i == steady - 1:
                recv_prev = False

            from_prev, from_next = exchange(send_next=output, send_prev=input_grad,
                                            recv_prev=recv_prev, recv_next=recv_next)
            _release_sent_output(output)
            if recv_prev:
                inputs[next_forward_chunk].append(from_prev)
            if recv_next:
                output_grads[next_backward_chunk].append(from_next)

        if not forward_only:
            if all_warmup and not last_rank:
                output_grads[num_chunks - 1].append(exchange(recv_next=True)[1])
            for k in range(steady, total):
                input_grad = run_backward(k)
                next_chunk = chunk_of(k + 1, forward=False)
                recv_next = not (last_rank and next_chunk == num_chunks - 1) and k != total - 1
                _, from_next = exchange(send_prev=input_grad, recv_next=recv_next)
                if recv_next:
                    output_grads[next_chunk].append(from_next)
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return losses
