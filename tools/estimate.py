"""Memory, communication and FLOPs per rank of a GPT training job, before renting GPUs.

Takes `pretrain_gpt.py`'s flags (paste the launch command's arguments), plus
the job's size: --world-size N, or --data-parallel-size D (world = TP x PP x D,
default D = 1). The model behind the numbers, and what it leaves out, is
`megatron_sr.estimate`'s docstring; docs/SCALING.md has tables made with it.

    python tools/estimate.py --num-layers 32 --hidden-size 4096 --num-attention-heads 32 \\
        --seq-length 2048 --micro-batch-size 1 --global-batch-size 512 \\
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 \\
        --data-parallel-size 8 --use-distributed-optimizer --precision bf16-sr

    ... --compare [PRECISION ...]   those --precision strategies (default all) side
                                    by side: ratios to bf16-mixed and amp, and whether
                                    the peak rank fits an 80 GB / 141 GB GPU
    ... --compare --markdown        the same as a Markdown table (docs/SCALING.md)

--lr, --train-iters and the data flags are not needed. The vocabulary comes
from the command's tokenizer files when they are readable, else --vocab-size,
else GPT-2's 50257; it is padded as `pretrain_gpt.py` pads it.
Exit status: 0, or 2 with the message `pretrain_gpt.py` would give for a bad flag.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sr.estimate import report_from_argv  # noqa: E402


def main(argv=None) -> int:
    try:
        report = report_from_argv(argv)
    except ValueError as error:
        print(f"estimate.py: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
