"""Reshape a megatron_sr checkpoint to another TP/PP layout, or export it to Hugging Face.

    python tools/checkpoint_convert.py --load CKPT --save OUT \
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    python tools/checkpoint_convert.py --load CKPT --save OUT --to-hf [--hf-dtype bfloat16]
    python tools/checkpoint_convert.py --load CKPT --save OUT --to-megatron \
        [--megatron-ckpt-format torch_dist|torch] [--target-...]
    python tools/checkpoint_convert.py --load MEGATRON_CKPT --save OUT --from-megatron \
        [--precision bf16-sr] [--no-optimizer]
    python tools/checkpoint_convert.py --load HF_DIR --save OUT --from-hf \
        [--target-tensor-parallel-size 2] [--make-vocab-size-divisible-by 128]

--load is a --save directory (its latest iteration) or an iter_XXXXXXX
directory. Reshaping keeps the iteration, weights, optimizer state and LR
schedule, so `pretrain_gpt.py --load OUT` with the new layout resumes; the RNG
states belong to the old layout's ranks and are not carried over. The export
writes a `transformers` model directory (GPT-2 style: learned positions,
LayerNorm, GeLU; Llama style: RoPE, RMSNorm, SwiGLU; Qwen2 style: Llama with
biases on q/k/v alone) with config.json,
model.safetensors and the tokenizer files when the checkpoint names them.
Nothing is left at --save when a conversion fails. --save must not exist or
be an empty directory, and must not be --load or lie inside it (or contain
it): a conversion never writes over a checkpoint.

--from-megatron imports a Megatron-LM checkpoint with its optimizer state
(torch_dist in model space or in the distributed optimizer's bucket layouts,
legacy with distrib_optim.pt; see
`megatron_sr.checkpointing.megatron_lm_optimizer`) as --precision stores it:
`pretrain_gpt.py --load OUT --precision ...` resumes at its iteration. Other
optimizers of the legacy format, or --no-optimizer, give the weights only
(--finetune).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_sr.checkpointing import (CheckpointError,  # noqa: E402
                                       unusable_output_directory)
from megatron_sr.checkpointing.conversion import (describe, export_hugging_face,  # noqa: E402
                                                  export_megatron_lm, import_hugging_face,
                                                  import_megatron_lm, load_full_checkpoint,
                                                  model_flags, write_reshaped)
from megatron_sr.model.hf_conversion import UnsupportedArchitectureError  # noqa: E402
from megatron_sr.precision.strategies import DEFAULT_STRATEGY, STRATEGIES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint to read")
    parser.add_argument("--save", required=True, help="where to write the result")
    parser.add_argument("--target-tensor-parallel-size", type=int)
    parser.add_argument("--target-pipeline-parallel-size", type=int)
    parser.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int,
                        help="interleaved layout of the result (default: none)")
    parser.add_argument("--to-hf", action="store_true", help="export a Hugging Face model")
    parser.add_argument("--from-hf", action="store_true",
                        help="--load is a Hugging Face GPT-2, Llama or Qwen2 model directory: "
                             "write it as a checkpoint of iteration 0 (start from it with "
                             "--finetune)")
    parser.add_argument("--from-megatron", action="store_true",
                        help="--load is a Megatron-LM checkpoint (torch_dist or legacy, local or "
                             "Transformer Engine names): write it as ours; one with its "
                             "optimizer state (Adam, main parameters) resumes (--load), otherwise "
                             "start from its weights with --finetune")
    parser.add_argument("--precision", choices=sorted(STRATEGIES), default=DEFAULT_STRATEGY,
                        help="with --from-megatron: the --precision of the run that resumes; the "
                             "optimizer state is written as that strategy stores it")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="with --from-megatron: the weights only (start with --finetune)")
    parser.add_argument("--to-megatron", action="store_true",
                        help="write the weights as a Megatron-LM checkpoint (load it there "
                             "with --finetune)")
    parser.add_argument("--megatron-ckpt-format", choices=("torch_dist", "torch"),
                        default="torch_dist",
                        help="with --to-megatron: Megatron-LM's default torch_dist (any TP/PP "
                             "loads it) or the legacy per-rank files at the target sizes")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="with --from-hf: pad the vocabulary to a multiple of this times "
                             "the target TP size, as the training run will")
    parser.add_argument("--params-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="with --from-hf: dtype of the imported weights")
    parser.add_argument("--hf-dtype", choices=("float32", "bfloat16"),
                        help="dtype of the exported weights (default: the checkpoint's)")
    return parser


def check_output_directory(load: str, save: str) -> None:
    """ValueError unless `save` is new or an empty directory, distinct from
    `load` and neither inside the other, not inside any published checkpoint,
    and creatable (no file on its way, a writable parent)."""
    problem = unusable_output_directory(save, "--save")
    if problem:
        raise ValueError(problem)
    source, target = os.path.realpath(load), os.path.realpath(save)
    if source == target or target.startswith(source + os.sep) \
            or source.startswith(target + os.sep):
        raise ValueError(f"--save {save} is --load {load} or overlaps it; write the conversion "
                         "to a new directory")
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ValueError(f"--save {save} already exists and is not an empty directory; choose "
                         "a new directory")


def export_to_new_directory(write, save: str) -> None:
    """Calls `write(staging)` on a staging directory this process creates next
    to `save` (a unique name: nothing that exists is ever removed), then
    renames it to `save`; on any failure only the staging directory goes."""
    parent = os.path.dirname(os.path.abspath(save)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(save)) + ".partial-",
                               dir=parent)
    try:
        write(staging)
        if os.path.isdir(save):
            os.rmdir(save)  # empty, checked by check_output_directory
        os.replace(staging, save)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_target_sizes(args) -> None:
    """ValueError naming the flag when a --target-* size is not a positive
    integer (0 or a negative number never means "keep": leave the flag out)."""
    for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size",
                 "target_num_layers_per_virtual_pipeline_stage"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be at least 1 (leave "
                             f"the flag out to keep the checkpoint's layout)")


def virtual_pipeline_size(num_layers: int, pp: int, per_stage: Optional[int]) -> Optional[int]:
    """The interleaved layout's number of virtual stages for
    --target-num-layers-per-virtual-pipeline-stage `per_stage` (None: not
    interleaved); ValueError unless the layers split evenly into virtual
    stages of `per_stage` layers on each of the `pp` stages (as
    pretrain_gpt.py requires of --num-layers-per-virtual-pipeline-stage)."""
    if per_stage is None:
        return None
    if num_layers % (pp * per_stage):
        raise ValueError(f"--target-num-layers-per-virtual-pipeline-stage {per_stage}: the "
                         f"checkpoint's {num_layers} layers do not split into virtual stages of "
                         f"{per_stage} layers on {pp} pipeline stages")
    return num_layers // (pp * per_stage)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    reshape = (args.target_tensor_parallel_size, args.target_pipeline_parallel_size)
    sources, targets = [args.from_hf, args.from_megatron], [args.to_hf, args.to_megatron]
    if sum(sources) > 1 or sum(targets) > 1 or (any(sources) and any(targets)):
        print("checkpoint_convert.py: error: give at most one of --from-hf, --from-megatron, "
              "--to-hf, --to-megatron", file=sys.stderr)
        return 2
    if not any(sources) and not args.to_megatron \
            and args.to_hf == any(v is not None for v in reshape):
        print("checkpoint_convert.py: error: give either --to-hf or "
              "--target-tensor-parallel-size/--target-pipeline-parallel-size", file=sys.stderr)
        return 2
    try:
        check_target_sizes(args)
        check_output_directory(args.load, args.save)
        if args.from_hf:
            checkpoint = import_hugging_face(
                args.load, params_dtype=getattr(torch, args.params_dtype),
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by
                * (args.target_tensor_parallel_size or 1))
        elif args.from_megatron:
            checkpoint = import_megatron_lm(
                args.load, precision=None if args.no_optimizer else args.precision)
        else:
            # The weights alone for an export; a reshaped checkpoint keeps the optimizer state.
            checkpoint = load_full_checkpoint(args.load,
                                              with_optimizer=not (args.to_hf or args.to_megatron))
        print(f"loaded {checkpoint.directory}: {describe(checkpoint)}")
        if args.to_hf:
            dtype = getattr(torch, args.hf_dtype) if args.hf_dtype else None
            families = []
            export_to_new_directory(
                lambda staging: families.append(export_hugging_face(checkpoint, staging, dtype)),
                args.save)
            print(f"exported a Hugging Face {families[0]} model to {args.save}")
        elif args.to_megatron:
            parallel = checkpoint.description["parallel"]
            tp = args.target_tensor_parallel_size or parallel["tensor_model_parallel_size"]
            pp = args.target_pipeline_parallel_size or parallel["pipeline_model_parallel_size"]
            export_to_new_directory(
                lambda staging: export_megatron_lm(checkpoint, staging, tp, pp,
                                                   args.megatron_ckpt_format), args.save)
            layout = "torch_dist" if args.megatron_ckpt_format == "torch_dist" \
                else f"legacy TP={tp} PP={pp}"
            print(f"wrote a Megatron-LM {layout} checkpoint to {args.save}")
        else:
            parallel = checkpoint.description["parallel"]
            tp = args.target_tensor_parallel_size or parallel["tensor_model_parallel_size"]
            pp = args.target_pipeline_parallel_size or parallel["pipeline_model_parallel_size"]
            vp = virtual_pipeline_size(checkpoint.config.num_layers, pp,
                                       args.target_num_layers_per_virtual_pipeline_stage)
            paths = []
            export_to_new_directory(
                lambda staging: paths.append(write_reshaped(checkpoint, staging, tp, pp, vp)),
                args.save)
            path = os.path.join(args.save, os.path.basename(paths[0]))
            print(f"wrote TP={tp} PP={pp}{f' VP={vp}' if vp else ''} checkpoint to {path}")
            if checkpoint.optimizer is not None and args.from_megatron:
                print(f"resume it with: pretrain_gpt.py --load {args.save} --precision "
                      f"{args.precision} {model_flags(checkpoint.config)} ... (the run's "
                      f"learning-rate flags as Megatron-LM's)")
            elif args.from_hf or args.from_megatron:
                print(f"start from it with: pretrain_gpt.py --load {args.save} --finetune "
                      f"{model_flags(checkpoint.config)} ...")
    except (CheckpointError, UnsupportedArchitectureError, ValueError, ImportError,
            FileNotFoundError) as exc:
        print(f"checkpoint_convert.py: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the output could not be written (nothing is left of it)
        print(f"checkpoint_convert.py: error: could not write --save {args.save}: {exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
